"""``xmoe`` command line: the parser, dispatch and error handling.

Each command group lives in its own module with ``add_parser(sub)``, which registers its
subcommands and their ``handler`` (heavy imports stay inside the handlers). Strings become
typed configs here and in those modules, nowhere below.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import bench, convert, experiments, export, hf, plot, train, translate
from . import exit as exit_commands

# Each module registers its subcommands with add_parser(sub), in this order in --help.
COMMAND_MODULES = (train, plot, experiments, bench, convert, hf, export, exit_commands, translate)

USAGE_EXAMPLES = """examples:
  xmoe train --config configs/demo.yaml --run-dir runs/demo
  xmoe train --run-dir runs/demo --resume --set train.steps=2000
  xmoe eval runs/demo
  xmoe eval runs/dense_t1 --threshold 0.5
  xmoe eval runs/dense_t1 --sweep-threshold 1.0,0.9,0.8,0.7,0.5,0.3
  xmoe generate runs/demo --prompt "ROMEO." --max-new-tokens 100
  xmoe plot runs/demo
  xmoe routers
  xmoe compare --routers switch,gshard,threshold --steps 400
  xmoe bench --quick

exit codes: 0 done, 1 the run failed (loss not finite, disk/OS error), 2 a bad input (one line
on stderr naming the file or key), 130 interrupted. See docs/reliability.md.
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


# Exit codes (docs/reliability.md): argparse's own usage errors also exit 2.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    """Run one ``xmoe`` command; returns its exit code.

    0: done. 2: a bad input (config, argument, file, a run dir in use or not an xmoe run, a
    checkpoint that fails its check): one line on stderr, nothing written. 1: the run itself
    failed (the loss diverged, the disk is full...). 130: interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # warnings (e.g. a checkpoint that failed its check and the fallback used) as one line
    warnings.formatwarning = lambda message, category, *rest, **kw: (
        f"xmoe {args.command}: warning: {message}\n"
    )
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        return _error(args, exc, EXIT_USAGE)
    except (OSError, FloatingPointError) as exc:
        return _error(args, exc, EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"xmoe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _error(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"xmoe {args.command}: error: {message or type(exc).__name__}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
