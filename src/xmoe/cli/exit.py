"""``xmoe`` subcommands of the exit feature (registered by :func:`add_parser`):
``xmoe exit-eval RUN [RUN ...]`` reports trained ``--task exit`` runs.

- a ``backbone=minilm`` run: every exit policy (JEI-DNN per λ, confidence and entropy
  thresholds per τ, each fixed exit) on the test split: accuracy, mean cost, ECE, conformal set
  size; ``table.md``, ``rows.json``, ``curve.png``, ``reliability.png``.
- ``backbone=gpt`` runs (several, one per setting): val perplexity against compute per token
  from their final evaluations, in one table and one plot (``lm_compute.png``).
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
    e = sub.add_parser(
        "exit-eval",
        help="early exit: accuracy, cost, ECE and conformal set size of JEI-DNN and baselines",
    )
    e.add_argument("run_dir", nargs="+", help="runs trained with `xmoe train --task exit`")
    e.add_argument("--out", help="output folder (default: RUN_DIR/exit_eval)")
    e.add_argument(
        "--alpha", type=float, default=0.1, help="conformal miscoverage (default: %(default)s)"
    )
    e.add_argument(
        "--names", help="gpt runs: comma-separated setting names (default: the run dir names)"
    )
    e.set_defaults(handler=exit_eval_command)


def exit_eval_command(args) -> int:
    from .._checks import check_range
    from ..train.run_dir import RunDir

    check_range("--alpha", args.alpha, 0.0, 1.0, low_open=True, high_open=True)
    backbones = []
    for path in args.run_dir:
        cfg = RunDir(path).load_config()
        if cfg.task != "exit":
            raise ValueError(f"run dir {path!r} is a {cfg.task!r} run, not an exit run")
        backbones.append(cfg.task_options.get("backbone", "minilm"))
    if set(backbones) == {"gpt"}:
        return lm_report(args)
    if backbones != ["minilm"]:
        raise ValueError("exit-eval takes one minilm run, or one or more gpt runs")
    return minilm_report(args, args.run_dir[0])


def minilm_report(args, run_dir: str) -> int:
    from .._io import markdown_table
    from ..exit.report import COLUMNS, EQUAL_COLUMNS, equal_cost, evaluate_policies, write_report
    from ..train.exit_task import eval_split, load_exit_run

    task, model = load_exit_run(run_dir)
    classes = model.cfg.num_classes
    val, test = eval_split(task, "val", classes), eval_split(task, "test", classes)
    rows = evaluate_policies(model, val, test, args.alpha)
    out = Path(args.out) if args.out else Path(run_dir) / "exit_eval"
    title = f"early exit on frozen MiniLM: {task.o.label} ({classes} classes), test split"
    paths = write_report(rows, out, title)
    print(title)
    print(markdown_table(rows, COLUMNS), end="")
    print("\nat equal mean cost:")
    print(markdown_table(equal_cost(rows), EQUAL_COLUMNS), end="")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def lm_report(args) -> int:
    from .._io import atomic_write, markdown_table
    from ..exit.report import LM_COLUMNS, lm_rows, plot_lm
    from ..train.run_dir import RunDir

    names = args.names.split(",") if args.names else [Path(p).name for p in args.run_dir]
    if len(names) != len(args.run_dir):
        raise ValueError(f"--names gives {len(names)} names for {len(args.run_dir)} runs")
    rows = []
    for name, path in zip(names, args.run_dir):
        run = RunDir(path)
        if not run.summary_path.exists():
            raise ValueError(f"run dir {path!r} has no summary.json (not finished?)")
        rows += lm_rows(name, run.read_summary())
    out = Path(args.out) if args.out else Path(args.run_dir[0]) / "exit_eval"
    table = markdown_table(rows, LM_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "lm_table.md", table)
    atomic_write(out / "lm_rows.json", json.dumps(rows, indent=1))
    plot = plot_lm(rows, out, "GPT with exits: depth x width")
    print(table, end="")
    print(f"table: {out / 'lm_table.md'}\nplot: {plot}")
    return 0
