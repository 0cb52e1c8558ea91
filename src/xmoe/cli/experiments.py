"""``xmoe compare``, ``xmoe routers`` and the threshold sweep of ``xmoe eval``."""

from __future__ import annotations

from pathlib import Path

from .options import add_set_option, command_line


def add_parser(sub) -> None:
    sub.add_parser("routers", help="list the available routers").set_defaults(
        handler=routers_command
    )

    c = sub.add_parser(
        "compare", help="train several routers on the same GPT/corpus budget and tabulate them"
    )
    c.add_argument("--routers", help="comma-separated router or variant names (see --list)")
    c.add_argument(
        "--preset",
        choices=("paper", "paper-ablation"),
        help="paper: the XMoE paper's LM grid at equal total expert width (docs/results.md); "
        "paper-ablation: the XMoE-64 recipe ablation; "
        "resumable, writes results.json/.md and pareto.png",
    )
    c.add_argument("--seeds", type=int, default=3, help="seeds per row with --preset (%(default)s)")
    c.add_argument("--rows", help="with --preset: only these comma-separated rows")
    c.add_argument("--list", action="store_true", help="list the named variants and exit")
    c.add_argument("--steps", type=int, default=None, help="training steps per variant")
    c.add_argument(
        "--config",
        default=None,
        help="base config (default: configs/demo.yaml; with --preset paper configs/paper.yaml)",
    )
    add_set_option(c, "override a base config key for every variant")
    c.add_argument("--out", default=None, help="output directory (runs/compare or runs/paper)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(handler=compare_command)


def routers_command(args) -> int:
    from ..routing import available_routers

    routers = available_routers()
    width = max(map(len, routers))
    for name, desc in routers.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def compare_command(args) -> int:
    from ..experiments.compare import VARIANTS, results_table, run_comparison, variant_configs
    from ..train.config import parse_overrides

    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name:<22} {spec}")
        return 0
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.preset:
        return _preset_command(args)
    if not args.routers:
        raise ValueError("--routers is required (comma-separated names; see --list)")
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--routers names no router: {args.routers!r}")
    configs = variant_configs(
        names,
        config=args.config or "configs/demo.yaml",
        overrides=parse_overrides(args.overrides),
        steps=args.steps,
    )
    out = Path(args.out or "runs/compare")
    rows = run_comparison(configs, out, progress=not args.no_progress, command=command_line(args))
    print(results_table(rows))
    print(f"results: {out / 'results.md'} and results.json")
    return 0


def _preset_command(args) -> int:
    """``xmoe compare --preset paper --seeds 3``: the resumable paper grid."""
    from ..experiments.grid import aggregate, run_grid
    from ..experiments.paper import PAPER_CONFIG, preset_rows
    from ..train.config import load_config, parse_overrides

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    overrides = parse_overrides(args.overrides)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    config = args.config or PAPER_CONFIG
    model = load_config(config, overrides).model
    rows = all_rows = preset_rows(args.preset, model.d_ff, model.d_model)
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown or not wanted:
            raise ValueError(f"--rows: unknown {unknown}; accepted: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in wanted]
    out = Path(args.out or f"runs/{args.preset}")
    records = run_grid(
        rows,
        list(range(args.seeds)),
        out,
        config=config,
        overrides=overrides,
        progress=not args.no_progress,
        command=command_line(args),
        table_rows=all_rows,
    )
    for line in aggregate(records, rows):
        print(
            f"{line['row']:<20} ppl {line['val_ppl']:7.2f} ± {line['val_ppl_std']:.2f}  "
            f"MoE FLOPs {line['moe_compute_ratio']:.3f}x  seeds {line['seeds']}"
        )
    print(f"results: {out / 'results.md'}, results.json, pareto.png")
    return 0


def threshold_overrides(run, threshold: float, renormalize: bool) -> dict[str, object]:
    """The overrides that run ``run`` (a RunDir) at another router threshold."""
    from ..experiments import threshold_sweep

    router = run.load_config().model.moe.router
    return threshold_sweep.threshold_overrides(router, threshold, renormalize)


def sweep_command(args, run, thresholds: list[float]) -> int:
    """``xmoe eval RUN --sweep-threshold T1,T2,...``."""
    from tqdm import tqdm

    from ..experiments.threshold_sweep import sweep_table, write_sweep
    from ..train.config import parse_overrides
    from ..train.run_dir import load_run

    settings = [(t, r) for r in (False, True) for t in thresholds]
    if args.renormalize is not None:
        settings = [(t, r) for t, r in settings if r == args.renormalize]
    user = parse_overrides(args.overrides)
    rows = []
    for t, renorm in tqdm(settings, desc="sweep", unit="eval"):
        loaded = load_run(run, user, threshold_overrides(run, t, renorm))
        result = loaded.evaluate(args.batch_size, args.max_tokens)
        ept = result["val_experts_per_token"]
        rows.append(
            dict(
                threshold=t,
                renormalize=renorm,
                val_ppl=result["val_ppl"],
                val_loss=result["val_loss"],
                experts_per_token=sum(ept) / len(ept),
                experts_per_token_per_layer=ept,
                moe_compute_ratio=result["val_moe_compute_ratio"],
                val_tokens=result["val_tokens"],
            )
        )
    title = f"threshold sweep of {run.path}"
    files = write_sweep(rows, Path(args.out) if args.out else run.path / "sweep", title)
    print(sweep_table(rows, title))
    print("files: " + ", ".join(map(str, files)))
    return 0
