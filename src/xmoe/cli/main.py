"""``xmoe`` command line: the parser, dispatch and error handling.

Each command group lives in its own module with ``add_parser(sub)``, which registers its
subcommands and their ``handler`` (heavy imports stay inside the handlers). Strings become
typed configs here and in those modules, nowhere below.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, convert, experiments, export, hf, train, translate
from . import exit as exit_commands

# Each module registers its subcommands with add_parser(sub), in this order in --help.
COMMAND_MODULES = (train, experiments, bench, convert, hf, export, exit_commands, translate)

USAGE_EXAMPLES = """examples:
  xmoe train --config configs/demo.yaml --run-dir runs/demo
  xmoe train --run-dir runs/demo --resume --set train.steps=2000
  xmoe eval runs/demo
  xmoe eval runs/dense_t1 --threshold 0.5
  xmoe eval runs/dense_t1 --sweep-threshold 1.0,0.9,0.8,0.7,0.5,0.3
  xmoe generate runs/demo --prompt "ROMEO." --max-new-tokens 100
  xmoe routers
  xmoe compare --routers switch,gshard,threshold --steps 400
  xmoe bench --quick
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xmoe",
        description="Sparse Mixture-of-Experts: small experts, threshold routing.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"xmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
