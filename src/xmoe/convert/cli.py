"""``xmoe convert`` and ``xmoe convert-eval`` (placeholder until the conversion lands)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
