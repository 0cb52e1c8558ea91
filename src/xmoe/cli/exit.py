"""``xmoe`` subcommands of the exit feature (registered by :func:`add_parser`):
``xmoe exit-eval RUN`` measures every exit policy of a trained ``--task exit`` run."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
    e = sub.add_parser(
        "exit-eval",
        help="early exit: accuracy, cost, ECE and conformal set size of JEI-DNN and baselines",
    )
    e.add_argument("run_dir", help="a run trained with `xmoe train --task exit`")
    e.add_argument("--out", help="output folder (default: RUN_DIR/exit_eval)")
    e.add_argument(
        "--alpha", type=float, default=0.1, help="conformal miscoverage (default: %(default)s)"
    )
    e.set_defaults(handler=exit_eval_command)


def exit_eval_command(args) -> int:
    from .._checks import check_range
    from .._io import markdown_table
    from ..exit.report import COLUMNS, equal_cost, evaluate_policies, write_report
    from ..train.exit_task import eval_split, load_exit_run

    check_range("--alpha", args.alpha, 0.0, 1.0, low_open=True, high_open=True)
    task, model = load_exit_run(args.run_dir)
    classes = model.cfg.num_classes
    val, test = eval_split(task, "val", classes), eval_split(task, "test", classes)
    rows = evaluate_policies(model, val, test, args.alpha)
    out = Path(args.out) if args.out else Path(args.run_dir) / "exit_eval"
    title = f"early exit on frozen MiniLM: {task.o.label} ({classes} classes), test split"
    paths = write_report(rows, out, title)
    print(title)
    print(markdown_table(rows, COLUMNS), end="")
    from ..exit.report import EQUAL_COLUMNS

    print("\nat equal mean cost:")
    print(markdown_table(equal_cost(rows), EQUAL_COLUMNS), end="")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
