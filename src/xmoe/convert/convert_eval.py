"""Evaluate a converted model against its dense reference: the library side of
``xmoe convert-eval``.

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
from .base import resolve_model
from .convert import converted_ffns, set_mode
from .data import heldout_sentences
from .evaluate import (
    apply_threshold,
    embed,
    environment,
    evaluate_point,
    measure_speedup,
    sentence_batches,
)
from .saving import MANIFEST, load_converted

ROUTER_MODES = ("learned", "oracle")
SAVED = "saved"  # convert-eval threshold: each FFN at the threshold it was saved with


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
