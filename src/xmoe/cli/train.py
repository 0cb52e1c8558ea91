"""``xmoe train``, ``xmoe eval`` and ``xmoe generate``: a run from config to text."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .options import add_set_option


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model (default: a GPT with MoE FFNs on the corpus)")
    t.add_argument("--config", help="YAML config (defaults apply to missing keys)")
    t.add_argument(
        "--task",
        help="what to train: lm (default), exit, translate; same as --set task=NAME",
    )
    add_set_option(t, "override a config key, e.g. --set model.moe.router_options.threshold=0.8")
    t.add_argument(
        "--run-dir", default="runs/default", help="output directory (default: %(default)s)"
    )
    t.add_argument("--data", help="UTF-8 text file or folder to train on (default: Shakespeare)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    t.add_argument("--overwrite", action="store_true", help="start over in a non-empty --run-dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=train_command)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on the validation split")
    e.add_argument("run_dir")
    e.add_argument("--max-tokens", type=int, default=None, help="cap on val tokens (default: all)")
    e.add_argument("--batch-size", type=int, default=None)
    add_set_option(e, "override a model config key at eval time (e.g. the router threshold)")
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
    e.set_defaults(handler=eval_command)

    g = sub.add_parser("generate", help="sample text from a run's checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(handler=generate_command)


def train_command(args) -> int:
    from ..train.config import load_config, parse_overrides
    from ..train.loop import train
    from ..train.run_dir import RunDir

    run = RunDir(args.run_dir)
    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides.pop("data.path", None)
        overrides["data.path"] = args.data
    if args.task:
        overrides.pop("task", None)
        overrides["task"] = args.task
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's saved config.yaml; drop --config")
        if not run.config_path.exists():
            raise ValueError(
                f"--resume: no config.yaml in run dir {str(run.path)!r} (no run started there); "
                "train without --resume, or with --overwrite"
            )
        cfg = run.load_config(overrides)
    else:
        cfg = load_config(args.config, overrides)
    summary = train(
        cfg, run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(summary_lines(summary, run.path))
    return 0


def summary_lines(summary: dict, run_dir: Path) -> str:
    ept = summary.get("experts_per_token_per_layer") or []
    lines = [
        f"run: {run_dir}",
        f"  steps            {summary['steps']}  ({summary['tokens_seen']:,} tokens, "
        f"{summary['train_time_s']:.0f}s, {summary['train_tokens_per_s']:.0f} tok/s)",
    ]
    if summary.get("task", "lm") == "lm":
        lines.append(
            f"  val_ppl          {summary['val_ppl']:.2f}   (val_loss {summary['val_loss']:.4f}; "
            f"unigram baseline ppl {summary['unigram_ppl']:.1f})"
        )
    else:  # another task: its own validation figures (val_* / test_* numbers)
        figures = {
            k: v
            for k, v in summary.items()
            if k.startswith(("val_", "test_")) and isinstance(v, int | float)
        }
        lines.append(f"  task             {summary['task']}")
        lines += [f"  {k:<16} {v:.4f}" for k, v in figures.items()]
    if ept:
        lines += [
            f"  experts/token    {summary['experts_per_token']:.2f} mean; per MoE layer: "
            + ", ".join(f"{v:.2f}" for v in ept),
            f"  moe_compute_ratio {summary['moe_compute_ratio']:.3f}  (expert FLOPs per token / "
            f"dense FFN of width {summary['d_ff']})",
            f"  load imbalance   {summary['load_imbalance']:.2f} mean max/mean expert load",
        ]
    lines.append(f"  summary          {run_dir / 'summary.json'}")
    return "\n".join(lines)


def eval_command(args) -> int:
    from ..experiments.threshold_sweep import DEFAULT_RENORMALIZE, check_threshold, parse_thresholds
    from ..train.config import parse_overrides
    from ..train.run_dir import RunDir, load_run
    from .experiments import sweep_command, threshold_overrides

    run = RunDir(args.run_dir)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and args.sweep_threshold:
        raise ValueError("use either --threshold or --sweep-threshold, not both")
    if args.sweep_threshold:
        return sweep_command(args, run, parse_thresholds(args.sweep_threshold))
    overrides = [parse_overrides(args.overrides)]
    if args.threshold is not None:
        check_threshold("--threshold", args.threshold)
        renorm = DEFAULT_RENORMALIZE if args.renormalize is None else args.renormalize
        overrides.append(threshold_overrides(run, args.threshold, renorm))
    elif args.renormalize is not None:
        raise ValueError("--renormalize/--no-renormalize only apply with --threshold")
    result = load_run(run, *overrides).evaluate(args.batch_size, args.max_tokens)
    print(json.dumps(result, indent=2))
    return 0


def generate_command(args) -> int:
    import torch

    from ..train.run_dir import load_run

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    loaded = load_run(args.run_dir)
    torch.manual_seed(args.seed)
    tokenizer = loaded.data.tokenizer
    idx = torch.tensor([tokenizer.encode(args.prompt).ids or [0]], dtype=torch.long)
    out = loaded.model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)
    print(tokenizer.decode(out[0].tolist()))
    return 0
