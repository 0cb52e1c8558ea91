"""``xmoe translate`` (a trained translate run: Folio spelling in, modern spelling out) and
``xmoe translate-compare`` (the MoE comparison grid of docs/translation.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import add_set_option, command_line


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
    t = sub.add_parser("translate", help="translate lines with a trained `--task translate` run")
    t.add_argument("run_dir")
    t.add_argument("--input", help="UTF-8 text, one source per line (default: stdin)")
    t.add_argument("--output", help="where to write one translation per line (default: stdout)")
    t.add_argument("--beam", type=int, default=None, help="beam size (1: greedy; default: run's)")
    t.add_argument(
        "--truncate",
        action="store_true",
        help="cut sources longer than the model's block_size instead of failing",
    )
    t.set_defaults(handler=translate_command)

    g = sub.add_parser(
        "translate-compare", help="dense / top-1 / top-2 / XMoE encoders on Folio -> modern"
    )
    g.add_argument("--seeds", type=int, default=3, help="seeds per row (default: %(default)s)")
    g.add_argument("--out", default="results/translate", help="output folder (resumable)")
    g.add_argument("--rows", help="comma-separated row names (default: all)")
    g.add_argument("--steps", type=int, default=None, help="training steps per run")
    add_set_option(g, "override a config key in every run, e.g. --set train.threads=1")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(handler=compare_command)


def translate_command(args) -> int:
    from ..train.translator import Translator

    if args.input:
        p = Path(args.input)
        if not p.is_file():
            raise ValueError(f"--input {args.input!r} is not a file")
        text = p.read_text("utf-8")
    else:
        text = sys.stdin.read()
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"input {args.input or '<stdin>'} holds no text to translate")
    out = Translator(args.run_dir).translate(lines, args.beam, args.truncate)
    result = "".join(line + "\n" for line in out)
    if args.output:
        from .._io import atomic_write

        atomic_write(args.output, result)
    else:
        sys.stdout.write(result)
    return 0


def compare_command(args) -> int:
    from ..experiments.translate_grid import run_grid
    from ..train.config import parse_overrides

    rows = args.rows.split(",") if args.rows else None
    run_grid(
        Path(args.out),
        seeds=args.seeds,
        rows=rows,
        steps=args.steps,
        overrides=parse_overrides(args.overrides),
        command=command_line(args),
        progress=not args.no_progress,
    )
    return 0
