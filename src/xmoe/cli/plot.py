"""``xmoe plot RUN``: PNGs of a run's loss, perplexity and experts per token per layer."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="write PNGs of a run's loss / perplexity curves and experts per token per layer",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    p.set_defaults(handler=plot_command)


def plot_command(args) -> int:
    from ..train.plots import plot_run

    files = plot_run(args.run_dir, args.out)
    print("files: " + ", ".join(map(str, files)))
    return 0
