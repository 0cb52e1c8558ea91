"""Arguments shared by several commands."""

from __future__ import annotations

import argparse
import shlex


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; parsed by
    :func:`xmoe.train.config.parse_overrides`."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for result files."""
    return "xmoe " + " ".join(shlex.quote(a) for a in args.argv)
