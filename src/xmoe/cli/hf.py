"""``xmoe hf-eval`` and ``xmoe hf-sweep``: xmoe routers on a pretrained HF MoE model.

The work is library code (:mod:`xmoe.hf.session`, :mod:`xmoe.hf.sweep`); this module only turns
flags into typed configs. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import json
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc


def _common(p) -> None:
    p.add_argument(
        "model", help="a local HF model folder (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V3)"
    )
    p.add_argument("--data", help="UTF-8 text file or folder (default: the Shakespeare corpus)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="tail of each document evaluated on; the rest calibrates (%(default)s)",
    )
    p.add_argument("--seq-len", type=int, help="window length (default: min(max positions, 256))")
    p.add_argument("--max-tokens", type=int, default=16384, help="eval tokens (%(default)s)")
    p.add_argument(
        "--calib-tokens", type=int, default=4096, help="calibration tokens (%(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="(%(default)s)")
    p.add_argument("--backend", default="auto", help="xmoe expert backend (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (%(default)s)")


def add_parser(sub) -> None:
    """Add this feature's subcommands to the ``xmoe`` subparsers ``sub``."""
    e = sub.add_parser(
        "hf-eval",
        help="perplexity, experts/token per layer and forward time of an HF MoE model "
        "with xmoe routing",
        description="Load an HF MoE model with xmoe MoE blocks, set one routing, and report "
        "perplexity, routed experts per token per layer and the forward wall-clock against "
        "HF's own experts implementation.",
    )
    _common(e)
    rule = e.add_mutually_exclusive_group()
    rule.add_argument("--threshold", help="t, or one t per MoE layer (comma-separated)")
    rule.add_argument("--topk", type=int, help="fixed k experts per token")
    rule.add_argument(
        "--flop-fraction",
        type=float,
        help="per-layer t fitted on calibration text to this fraction of native top-k FLOPs",
    )
    rule.add_argument(
        "--target-experts",
        type=float,
        help="per-layer t fitted to this mean routed experts/token",
    )
    rule.add_argument("--native", action="store_true", help="the model's own routing (default)")
    e.add_argument(
        "--entropy-k",
        action="store_true",
        help="with --flop-fraction / --target-experts: fit the entropy-k rule instead of t",
    )
    e.add_argument(
        "--candidates",
        type=int,
        help="threshold among the top-c experts only, shares renormalised (c = native k: "
        "a threshold within the model's top-k)",
    )
    e.add_argument(
        "--global-t",
        action="store_true",
        help="with --flop-fraction / --target-experts: one t for all layers (their mean)",
    )
    e.add_argument(
        "--max-experts", type=int, help="cap on experts/token of --threshold / --flop-fraction"
    )
    e.add_argument("--no-time", action="store_true", help="skip the wall-clock comparison")
    e.add_argument("--json", help="also write the result as JSON to this file")
    e.set_defaults(handler=_eval)

    s = sub.add_parser(
        "hf-sweep",
        help="perplexity vs compute of an HF MoE model: thresholds, budgets, entropy-k "
        "(table + PNG)",
    )
    _common(s)
    s.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95", help="global t (%(default)s)")
    s.add_argument(
        "--flop-fractions",
        default="0.5,0.625,0.75,0.875",
        help="budgets as fractions of native top-k expert FLOPs (%(default)s)",
    )
    s.add_argument("--topk", default="1", help="other fixed k to include (%(default)s)")
    s.add_argument("--no-entropy", action="store_true", help="skip the entropy-k baseline")
    s.add_argument(
        "--no-capped", action="store_true", help="skip the budgets capped at the native k"
    )
    s.add_argument(
        "--no-within-topk",
        action="store_true",
        help="skip the budgets met by a threshold within the native top-k",
    )
    s.add_argument(
        "--no-global", action="store_true", help="skip the budgets met by one t for all layers"
    )
    s.add_argument("--no-time", action="store_true", help="skip the wall-clock comparison")
    s.add_argument(
        "--time-fraction", type=float, default=0.75, help="budget timed vs HF (%(default)s)"
    )
    s.add_argument("--out", required=True, help="output folder: sweep.json, sweep.md, sweep.png")
    s.set_defaults(handler=_sweep)


def _session_config(args):
    from xmoe.hf.session import SessionConfig

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return SessionConfig(
        model=args.model,
        data=args.data,
        val_fraction=args.val_fraction,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        calib_tokens=args.calib_tokens,
        batch_size=args.batch_size,
        backend=args.backend,
        reference=not args.no_time,
    )


def _eval(args) -> int:
    from xmoe.hf.evaluate import environment
    from xmoe.hf.session import Point, Session

    if args.entropy_k and args.flop_fraction is None and args.target_experts is None:
        raise ValueError("--entropy-k needs --flop-fraction or --target-experts")
    cap = args.max_experts
    if args.threshold is not None:
        ts = _floats(args.threshold)
        point = Point(
            "threshold",
            threshold=ts[0] if len(ts) == 1 else ts,
            max_experts=cap,
            candidates=args.candidates,
        )
    elif args.topk is not None:
        point = Point("topk", k=args.topk)
    elif args.flop_fraction is not None or args.target_experts is not None:
        rule = "entropy_k" if args.entropy_k else "budget"
        point = Point(
            rule,
            flop_fraction=args.flop_fraction,
            target=args.target_experts,
            max_experts=cap if rule == "budget" else None,
            candidates=args.candidates if rule == "budget" else None,
            per_layer=not args.global_t,
        )
    else:
        point = Point("native")
    session = Session(_session_config(args))
    native = session.evaluate(Point("native"))
    row = dict(native) if point.rule == "native" else session.evaluate(point)
    row["native_ppl"] = native["ppl"]
    row["native_check"] = session.native_check()
    print(f"model {args.model}: {session.windows.shape[0]} windows x {session.seq_len} tokens")
    if args.no_time:
        print("native routing vs HF: not checked (--no-time loads no HF reference)")
    else:
        print(f"native routing vs HF: max |logit diff| {row['native_check']:.2e}")
    print(f"routing {point.rule} {point.label}")
    delta = row["ppl"] / native["ppl"] - 1
    print(f"  ppl {row['ppl']:.4f}  (native {native['ppl']:.4f}, {delta:+.2%})")
    print(f"  experts/token per layer: {' '.join(f'{v:.3f}' for v in row['experts_per_token'])}")
    print(
        f"  mean {row['mean_experts_per_token']:.3f}  routed-expert FLOPs vs native top-k "
        f"{row['expert_flop_fraction']:.1%}"
    )
    if not args.no_time:
        timing = session.timing({"native": Point("native"), point.label: point}, args.repeats)
        row["timing_seconds"] = timing
        row["environment"] = environment()
        from xmoe.hf.sweep import format_timing

        print(format_timing(timing))
        env = row["environment"]
        print(f"  CPU {env['cpu']}, bf16 flags {env['cpu_bf16_flags']}, threads {env['threads']}")
    if args.json:
        from xmoe._io import atomic_write

        atomic_write(args.json, json.dumps(row, indent=2, default=float) + "\n")
    return 0


def _sweep(args) -> int:
    from xmoe.hf.sweep import SweepConfig, run_sweep, write_sweep

    cfg = SweepConfig(
        session=_session_config(args),
        thresholds=tuple(_floats(args.thresholds)),
        flop_fractions=tuple(_floats(args.flop_fractions)),
        topk=tuple(_ints(args.topk)),
        entropy=not args.no_entropy,
        capped=not args.no_capped,
        global_t=not args.no_global,
        within_topk=not args.no_within_topk,
        timing=not args.no_time,
        timing_fraction=args.time_fraction,
        repeats=args.repeats,
    )
    result = run_sweep(cfg)
    result["command"] = "xmoe " + " ".join(args.argv)
    paths = write_sweep(result, Path(args.out))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
