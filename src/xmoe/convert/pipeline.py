"""End to end: convert a pretrained model directory (the library side of ``xmoe convert``).

    manifest = convert_pretrained("minilm", out_dir, ConvertConfig(num_experts=32))

The base model is found and loaded by :mod:`.base`; ``xmoe convert-eval`` is
:mod:`.convert_eval` (its names are importable from here too). Heavy imports (transformers)
happen inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import MINILM, check_divides, ffn_width, load_base, resolve_model
from .calibrate import calibration_batches
from .convert import (
    ConvertConfig,
    convert_model,
    converted_ffns,
    fit_router,
    set_mode,
    set_threshold,
    set_thresholds,
)
from .convert_eval import (
    ROUTER_MODES,
    SAVED,
    EvalConfig,
    EvalCorpus,
    eval_corpus,
    eval_rows,
    evaluate_converted,
    reference_embeddings,
)
from .data import calibration_texts
from .finetune import distill
from .saving import save_converted

__all__ = [
    "MINILM",
    "ROUTER_MODES",
    "SAVED",
    "EvalConfig",
    "EvalCorpus",
    "Finetune",
    "check_divides",
    "convert_pretrained",
    "eval_corpus",
    "eval_rows",
    "evaluate_converted",
    "ffn_width",
    "load_base",
    "reference_embeddings",
    "reference_rows",
    "refit_routers",
    "resolve_model",
]


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

    from .budget import fit_budget
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
