"""``xmoe`` subcommands of the exit feature (registered by :func:`add_parser`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
