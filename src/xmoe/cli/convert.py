"""``xmoe convert``, ``xmoe convert-eval`` and ``xmoe convert-sweep``: flags → typed configs.

The work is library code: :mod:`xmoe.convert.pipeline` (convert), :mod:`xmoe.convert.convert_eval`
(evaluate) and :mod:`xmoe.experiments.convert_sweep`. The flag parsers are :mod:`.convert_args`,
the printed summaries :mod:`.convert_report`. Heavy imports (torch models, transformers) happen
inside the handlers so ``xmoe --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from .convert_args import (
    eval_config,
    parse_choices,
    parse_floats,
    parse_ints,
    require_positive,
    setup_threads,
)
from .convert_report import convert_lines, eval_lines

MINILM = "minilm"  # xmoe.convert.base.MINILM (not imported here: `xmoe --help` stays fast)
DEFAULT_THRESHOLDS = "1.0,0.95,0.9,0.8,0.7,0.6,0.5"


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
    c = sub.add_parser(
        "convert",
        help="split a pretrained HF model's FFNs into small experts with a threshold router",
        description="Convert a dense Hugging Face model (BERT, GPT-2 or Llama-style FFNs): "
        "split each FFN's neurons into equal experts and fit a router on calibration text.",
    )
    c.add_argument(
        "--model",
        required=True,
        help="'minilm' (the installed all-MiniLM-L6-v2) or a local HF model directory",
    )
    c.add_argument(
        "--experts", type=int, default=32, help="experts per FFN; must divide d_ff (%(default)s)"
    )
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--split", default="coact", help="coact | params | random (%(default)s)")
    c.add_argument("--router", default="learned", help="learned | oracle (%(default)s)")
    c.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="default keep threshold t saved with the model (%(default)s)",
    )
    c.add_argument(
        "--calib-tokens", type=int, default=16384, help="calibration tokens (%(default)s)"
    )
    c.add_argument(
        "--calib-data",
        help="UTF-8 text file or folder for calibration (default: Shakespeare, training part)",
    )
    c.add_argument(
        "--router-steps", type=int, default=300, help="Adam steps per router fit (%(default)s)"
    )
    c.add_argument(
        "--router-target",
        default="share",
        help="what the learned router predicts: share (softmax vs the oracle's activation-mass "
        "share) | select (a sigmoid per expert vs the oracle's keep set at --label-threshold) "
        "(%(default)s)",
    )
    c.add_argument(
        "--label-threshold",
        type=float,
        default=0.5,
        help="oracle threshold whose keep set labels --router-target select (%(default)s)",
    )
    c.add_argument(
        "--relufy",
        action="store_true",
        help="ReLU-fication: swap the FFN activation for ReLU, then refit each second layer "
        "to the dense model's outputs (least squares) before splitting the routers' targets",
    )
    c.add_argument(
        "--refit",
        action="store_true",
        help="least-squares refit of each FFN's second layer at the operating point "
        "(--threshold or --flop-budget), layer by layer",
    )
    c.add_argument(
        "--refit-ridge",
        type=float,
        default=1e-2,
        help="relative ridge of the refits, toward the old weights (%(default)s)",
    )
    c.add_argument(
        "--flop-budget",
        type=float,
        default=None,
        help="fit per-layer thresholds so that the mean FFN FLOP fraction is this, in (0, 1] "
        "(replaces --threshold as the operating point)",
    )
    c.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="distillation steps of the experts at --finetune-threshold (0: none)",
    )
    c.add_argument(
        "--finetune-threshold",
        type=float,
        default=None,
        help="threshold the experts are fine-tuned at (default: the operating point)",
    )
    c.add_argument("--finetune-lr", type=float, default=1e-4, help="(%(default)s)")
    c.add_argument(
        "--finetune-params",
        default="ffn",
        help="what the distillation trains: ffn (the experts and output biases) | all "
        "(every weight but the routers) (%(default)s)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(handler=_convert)

    e = sub.add_parser(
        "convert-eval",
        help="fidelity / FLOP / speed table of a converted model against its dense base",
    )
    e.add_argument("dir", help="a directory written by `xmoe convert`")
    e.add_argument(
        "--thresholds",
        default=DEFAULT_THRESHOLDS,
        help="comma-separated t values, or 'saved' for each layer's saved threshold (%(default)s)",
    )
    e.add_argument(
        "--routers", default="learned,oracle", help="comma-separated: learned, oracle (%(default)s)"
    )
    e.add_argument(
        "--shakespeare", type=int, default=500, help="held-out Shakespeare lines (%(default)s)"
    )
    e.add_argument(
        "--stdlib", type=int, default=300, help="stdlib docstring sentences (%(default)s)"
    )
    e.add_argument("--no-speed", action="store_true", help="skip the wall-clock measurements")
    e.add_argument("--repeats", type=int, default=5, help="timing repeats per point (%(default)s)")
    e.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    e.add_argument("--json", help="write the rows here (default: DIR/eval.json)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(handler=_convert_eval)

    s = sub.add_parser(
        "convert-sweep",
        help="convert with every E x split; evaluate both routers over t; table and plot",
    )
    s.add_argument("--model", default=MINILM, help="(%(default)s)")
    s.add_argument("--experts", default="16,32,64", help="comma-separated E values (%(default)s)")
    s.add_argument("--splits", default="coact,params,random", help="(%(default)s)")
    s.add_argument("--routers", default="learned,oracle", help="(%(default)s)")
    s.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="(%(default)s)")
    s.add_argument("--calib-tokens", type=int, default=16384, help="(%(default)s)")
    s.add_argument("--router-steps", type=int, default=300, help="(%(default)s)")
    s.add_argument("--shakespeare", type=int, default=500, help="(%(default)s)")
    s.add_argument("--stdlib", type=int, default=300, help="(%(default)s)")
    s.add_argument("--no-speed", action="store_true", help="skip the wall-clock measurements")
    s.add_argument("--repeats", type=int, default=5, help="timing repeats per point (%(default)s)")
    s.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    s.add_argument("--out", default="runs/convert/sweep", help="output directory (%(default)s)")
    s.add_argument("--plot", help="also write the PNG plot here (default: OUT/sweep.png)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(handler=_convert_sweep)


# ------------------------------------------------------------------------------ convert


def _convert(args) -> int:
    from ..convert.convert import ConvertConfig
    from ..convert.pipeline import Finetune, convert_pretrained

    cfg = ConvertConfig(
        num_experts=args.experts,
        split=args.split,
        router=args.router,
        threshold=args.threshold,
        calib_tokens=args.calib_tokens,
        router_steps=args.router_steps,
        router_target=args.router_target,
        label_threshold=args.label_threshold,
        relufy=args.relufy,
        refit=args.refit,
        refit_ridge=args.refit_ridge,
        flop_budget=args.flop_budget,
        seed=args.seed,
    )
    cfg.validate()
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and args.finetune_threshold is not None:
        parse_floats("--finetune-threshold", str(args.finetune_threshold))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"--out {str(out)!r} is not empty; pass --overwrite to replace its contents"
        )
    setup_threads(args.threads)
    finetune = (
        Finetune(
            args.finetune_steps, args.finetune_threshold, args.finetune_lr, args.finetune_params
        )
        if args.finetune_steps
        else None
    )
    manifest = convert_pretrained(
        args.model, out, cfg, args.calib_data, finetune, progress=not args.no_progress
    )
    print("\n".join(convert_lines(args.model, manifest, cfg, out)))
    return 0


# ------------------------------------------------------------------------------ convert-eval


def _convert_eval(args) -> int:
    routers = parse_choices("--routers", args.routers, ("learned", "oracle"))
    cfg = eval_config(args, routers, not args.no_progress, allow_saved=True)
    from ..convert.saving import MANIFEST

    d = Path(args.dir)
    if not (d / MANIFEST).is_file():
        raise ValueError(f"{str(d)!r} is not a directory written by `xmoe convert` (no {MANIFEST})")
    setup_threads(args.threads)
    from ..convert.convert_eval import evaluate_converted

    result = evaluate_converted(d, cfg, Path(args.json) if args.json else None)
    print("\n".join(eval_lines(d, result, cfg.speed)))
    return 0


# ------------------------------------------------------------------------------ convert-sweep


def _convert_sweep(args) -> int:
    experts = parse_ints("--experts", args.experts)
    from ..convert.split import SPLITS

    splits = parse_choices("--splits", args.splits, SPLITS)
    routers = parse_choices("--routers", args.routers, ("learned", "oracle"))
    eval_cfg = eval_config(args, routers, not args.no_progress)
    require_positive("--calib-tokens", args.calib_tokens)
    require_positive("--router-steps", args.router_steps)
    setup_threads(args.threads)
    from ..experiments.convert_sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        model=args.model,
        experts=experts,
        splits=splits,
        out=Path(args.out),
        plot=Path(args.plot) if args.plot else None,
        calib_tokens=args.calib_tokens,
        router_steps=args.router_steps,
        eval=eval_cfg,
    )
    result = run_sweep(cfg, log=lambda text: print(text, flush=True))
    print("wrote " + ", ".join(result["paths"]))
    return 0
