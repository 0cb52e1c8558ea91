"""``xmoe`` command line: train, eval, generate, routers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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

    t = sub.add_parser("train", help="train a GPT with MoE FFNs on the corpus")
    t.add_argument("--config", help="YAML config (defaults apply to missing keys)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.moe.router_options.threshold=0.8",
    )
    t.add_argument(
        "--run-dir", default="runs/default", help="output directory (default: %(default)s)"
    )
    t.add_argument("--data", help="UTF-8 text file or folder to train on (default: Shakespeare)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    t.add_argument("--overwrite", action="store_true", help="start over in a non-empty --run-dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on the validation split")
    e.add_argument("run_dir")
    e.add_argument("--max-tokens", type=int, default=None, help="cap on val tokens (default: all)")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config key at eval time (e.g. the router threshold)",
    )
    e.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="run the threshold router at this t in (0, 1] instead of the trained one",
    )
    e.add_argument(
        "--sweep-threshold",
        metavar="T1,T2,...",
        help="evaluate at each threshold (both renormalize settings); write a table and a plot",
    )
    e.add_argument(
        "--renormalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --threshold: rescale the kept probabilities to sum to 1 "
        "(default: off, the better of the two in docs/dense-to-sparse.md)",
    )
    e.add_argument("--out", help="sweep output directory (default: RUN_DIR/sweep)")

    g = sub.add_parser("generate", help="sample text from a run's checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)

    sub.add_parser("routers", help="list the available routers")

    c = sub.add_parser(
        "compare", help="train several routers on the same GPT/corpus budget and tabulate them"
    )
    c.add_argument("--routers", help="comma-separated router or variant names (see --list)")
    c.add_argument("--list", action="store_true", help="list the named variants and exit")
    c.add_argument("--steps", type=int, default=None, help="training steps per variant")
    c.add_argument("--config", default="configs/demo.yaml", help="base config (%(default)s)")
    c.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key for every variant",
    )
    c.add_argument("--out", default="runs/compare", help="output directory (%(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser(
        "bench",
        help="benchmark xmoe's dispatch against dense, loop, capacity and HF experts",
        description="Interleaved medians of every variant on the same routing and weights; "
        "writes JSON, a markdown table and a PNG plot. See BENCHMARKS.md.",
    )
    b.add_argument("--quick", action="store_true", help="the short suite (a few minutes)")
    b.add_argument(
        "--out", default="benchmarks/results", help="output directory (default: %(default)s)"
    )
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    b.add_argument(
        "--comm",
        action="store_true",
        help="also measure expert-parallel all-to-all volume/time (2 gloo processes)",
    )
    b.add_argument(
        "--profile",
        action="store_true",
        help="only profile where the time goes (GEMM, gather/scatter, ...) at the target config",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    # Subcommands that live with their feature: each module adds parsers whose
    # ``handler`` default is the command function (heavy imports stay inside the handler).
    from .convert import add_parsers as add_convert_parsers

    add_convert_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = getattr(args, "handler", None) or _COMMANDS[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"xmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from ..train import train
    from ..train.config import load_config

    run_dir = Path(args.run_dir)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's saved config.yaml; drop --config")
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            raise ValueError(f"--resume: no config.yaml in run dir {str(run_dir)!r}")
        cfg = load_config(config_path, overrides)
    else:
        cfg = load_config(args.config, overrides)
    summary = train(
        cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        _print_summary(summary, run_dir)
    return 0


def _print_summary(summary: dict, run_dir: Path) -> None:
    ept = summary.get("experts_per_token_per_layer") or []
    lines = [
        f"run: {run_dir}",
        f"  steps            {summary['steps']}  ({summary['tokens_seen']:,} tokens, "
        f"{summary['train_time_s']:.0f}s, {summary['train_tokens_per_s']:.0f} tok/s)",
        f"  val_ppl          {summary['val_ppl']:.2f}   (val_loss {summary['val_loss']:.4f}; "
        f"unigram baseline ppl {summary['unigram_ppl']:.1f})",
    ]
    if ept:
        lines += [
            f"  experts/token    {summary['experts_per_token']:.2f} mean; per MoE layer: "
            + ", ".join(f"{v:.2f}" for v in ept),
            f"  moe_compute_ratio {summary['moe_compute_ratio']:.3f}  (expert FLOPs per token / "
            f"dense FFN of width {summary['d_ff']})",
            f"  load imbalance   {summary['load_imbalance']:.2f} mean max/mean expert load",
        ]
    lines.append(f"  summary          {run_dir / 'summary.json'}")
    print("\n".join(lines))


def _load_run(run_dir: Path, overrides: list[str]):
    from ..train import find_checkpoint, load_data, load_weights
    from ..train.config import load_config
    from ..train.evo_recipe import build_model
    from ..train.trainer import checkpoint_step

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"run dir {str(run_dir)!r} has no config.yaml (not an xmoe run?)")
    cfg = load_config(cfg_path, overrides)
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"run dir {str(run_dir)!r} has no checkpoint")
    model = build_model(cfg, checkpoint_step(run_dir))
    load_weights(ckpt, model)
    model.eval()
    return cfg, model, load_data(cfg, run_dir)


def _eval(args) -> int:
    from ..experiments.threshold_sweep import DEFAULT_RENORMALIZE, check_threshold, parse_thresholds

    run_dir = Path(args.run_dir)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and args.sweep_threshold:
        raise ValueError("use either --threshold or --sweep-threshold, not both")
    if args.sweep_threshold:
        return _sweep(args, run_dir, parse_thresholds(args.sweep_threshold))
    overrides = list(args.overrides)
    if args.threshold is not None:
        check_threshold("--threshold", args.threshold)
        renorm = DEFAULT_RENORMALIZE if args.renormalize is None else args.renormalize
        overrides += _threshold_overrides(run_dir, args.threshold, renorm)
    elif args.renormalize is not None:
        raise ValueError("--renormalize/--no-renormalize only apply with --threshold")
    result = _evaluate_run(run_dir, overrides, args)
    print(json.dumps(result, indent=2))
    return 0


def _threshold_overrides(run_dir: Path, threshold: float, renormalize: bool) -> list[str]:
    from ..experiments.threshold_sweep import threshold_overrides
    from ..train.config import load_config

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"run dir {str(run_dir)!r} has no config.yaml (not an xmoe run?)")
    return threshold_overrides(load_config(cfg_path).model.moe.router, threshold, renormalize)


def _evaluate_run(run_dir: Path, overrides: list[str], args) -> dict:
    from ..train import evaluate

    cfg, model, data = _load_run(run_dir, overrides)
    return evaluate(model, data, args.batch_size or cfg.train.eval_batch_size, args.max_tokens)


def _sweep(args, run_dir: Path, thresholds: list[float]) -> int:
    from tqdm import tqdm

    from ..experiments.threshold_sweep import markdown_table, write_sweep

    settings = [(t, r) for r in (False, True) for t in thresholds]
    if args.renormalize is not None:
        settings = [(t, r) for t, r in settings if r == args.renormalize]
    rows = []
    for t, renorm in tqdm(settings, desc="sweep", unit="eval"):
        overrides = [*args.overrides, *_threshold_overrides(run_dir, t, renorm)]
        result = _evaluate_run(run_dir, overrides, args)
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
    title = f"threshold sweep of {run_dir}"
    files = write_sweep(rows, Path(args.out) if args.out else run_dir / "sweep", title)
    print(markdown_table(rows, title))
    print("files: " + ", ".join(map(str, files)))
    return 0


def _generate(args) -> int:
    import torch

    run_dir = Path(args.run_dir)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    cfg, model, data = _load_run(run_dir, [])
    torch.manual_seed(args.seed)
    ids = data.tokenizer.encode(args.prompt).ids or [0]
    idx = torch.tensor([ids], dtype=torch.long)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)
    print(data.tokenizer.decode(out[0].tolist()))
    return 0


def _routers(args) -> int:
    from ..routing import available_routers

    routers = available_routers()
    width = max(map(len, routers))
    for name, desc in routers.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _compare(args) -> int:
    import shlex

    from ..experiments.compare import VARIANTS, run_comparison, variant_overrides
    from ..train.config import load_config

    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name:<22} {spec}")
        return 0
    if not args.routers:
        raise ValueError("--routers is required (comma-separated names; see --list)")
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    from ..models import GPT

    for name in names:  # validate every variant (config and router options) before training
        GPT(load_config(args.config, [*args.overrides, *variant_overrides(name)]).model)
    command = "xmoe " + " ".join(shlex.quote(a) for a in args.argv)
    rows = run_comparison(
        names,
        Path(args.out),
        config=args.config,
        overrides=args.overrides,
        steps=args.steps,
        progress=not args.no_progress,
        command=command,
    )
    from ..experiments.compare import markdown_table

    print(markdown_table(rows))
    print(f"results: {Path(args.out) / 'results.md'} and results.json")
    return 0


def _bench(args) -> int:
    import shlex

    import torch

    from ..bench.suite import run_suite

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.profile:
        from ..bench.suite import profile_target

        print(profile_target())
        return 0
    command = "xmoe " + " ".join(shlex.quote(a) for a in args.argv)
    result = run_suite(args.quick, Path(args.out), not args.no_progress, command)
    print(_ratio_table(result))
    if args.comm:
        from ..bench.comm import format_table, run_comm_bench

        rows = run_comm_bench()
        print(format_table(rows))
        comm_path = Path(result["files"][0]).with_suffix(".comm.json")
        comm_path.write_text(json.dumps(rows, indent=1))
        result["files"].append(str(comm_path))
    print("files: " + ", ".join(result["files"]))
    return 0


def _ratio_table(result: dict) -> str:
    lines = ["ratio (target config: fp32 fwd+bwd, N=4096 d=512 E=64x128)   value   target   met"]
    for key, value in result["ratios"].items():
        op, bound = result["targets"].get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else ""
        met = result["met"].get(key)
        lines.append(f"  {key:<36} {value:8.3f}   {target:<7}  {'' if met is None else met}")
    return "\n".join(lines)


_COMMANDS = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "routers": _routers,
    "compare": _compare,
    "bench": _bench,
}


if __name__ == "__main__":
    sys.exit(main())
