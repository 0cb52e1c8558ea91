"""Fidelity, retrieval agreement, FLOPs and wall-clock speed of a converted encoder.

- Embeddings: mean pooling of the last hidden states over the attention mask (what
  sentence-transformers does for all-MiniLM-L6-v2; its final L2 normalisation does not change
  cosines).
- Fidelity: mean (and 5th percentile) cosine between each sentence's converted and dense
  embeddings. The dense reference is the same model with every FFN in ``dense`` mode (all
  neurons, plain GEMMs), which equals the original model up to float summation order.
- Retrieval agreement: each sentence queries all the others by cosine; the fraction whose top-1
  neighbour is the same under converted and dense embeddings.
- FFN FLOP fraction: per layer, (kept experts x expert FLOPs + router FLOPs) / dense FFN FLOPs,
  over non-padding tokens, averaged over layers. The oracle's routing cost is not counted (it is
  an upper bound, not a deployable router).
- Speed: the same batch through the FFNs alone and through the whole encoder, dense mode vs the
  sparse point, interleaved (order alternating), median of the per-repeat ratios after warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

from .._io import markdown_table
from .convert import converted_ffns, set_mode, set_threshold, set_thresholds
from .ffn import ConvertedFFN


def sentence_batches(
    tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Batches of sentences grouped by length (little padding) and ``order``: batch row k holds
    sentence ``order[k]``."""
    lengths = [
        len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences
    ]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = [sentences[j] for j in order[i : i + batch_size]]
        enc = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(dict(enc))
    return batches, torch.tensor(order)


@torch.no_grad()
def embed(
    model: nn.Module, batches: list[dict[str, Tensor]], order: Tensor
) -> tuple[Tensor, list[float]]:
    """Mean-pooled embeddings ``[S, d]`` in the original sentence order, and the experts kept per
    non-padding token for each converted FFN."""
    ffns = converted_ffns(model)
    kept = [0.0] * len(ffns)
    tokens = 0
    for f in ffns:
        f.record_kept = True
    outs = []
    try:
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append((h * m).sum(1) / m.sum(1).clamp_min(1))
            flat_mask = b["attention_mask"].reshape(-1).bool()
            tokens += int(flat_mask.sum())
            for i, f in enumerate(ffns):
                kept[i] += float(f.last_kept[flat_mask].sum())
    finally:
        for f in ffns:
            f.record_kept = False
            f.last_kept = None
    emb = torch.empty(len(order), outs[0].shape[-1])
    emb[order] = torch.cat(outs)
    return emb, [k / max(tokens, 1) for k in kept]


def fidelity(emb: Tensor, ref: Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    return {
        "cos_mean": float(cos.mean()),
        "cos_p5": float(cos.quantile(0.05)),
        "cos_min": float(cos.min()),
    }


def top1_agreement(emb: Tensor, ref: Tensor) -> float:
    def nn_idx(e: Tensor) -> Tensor:
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return float((nn_idx(emb) == nn_idx(ref)).float().mean())


def flop_fraction(ffns: list[ConvertedFFN], experts_per_token: list[float]) -> float:
    fr = [
        f.flops_per_token(e) / f.dense_flops_per_token
        for f, e in zip(ffns, experts_per_token, strict=True)
    ]
    return sum(fr) / len(fr)


def apply_threshold(model: nn.Module, threshold: float | list[float]) -> None:
    """One t for every converted FFN, or a list with one t per FFN (in module order)."""
    if isinstance(threshold, (list, tuple)):
        set_thresholds(model, list(threshold))
    else:
        set_threshold(model, threshold)


def evaluate_point(
    model, batches, order, dense_emb: Tensor, mode: str, threshold: float | list[float]
) -> dict:
    """One row: routing ``mode`` at ``threshold`` (one t, or one per FFN) against
    ``dense_emb``."""
    set_mode(model, mode)
    apply_threshold(model, threshold)
    emb, ept = embed(model, batches, order)
    ffns = converted_ffns(model)
    row = {
        "router": mode,
        "threshold": threshold,
        "experts_per_token": sum(ept) / len(ept),
        "experts_per_token_per_layer": [round(e, 3) for e in ept],
        "num_experts": ffns[0].num_experts,
        "ffn_flop_fraction": flop_fraction(ffns, ept),
    }
    row.update(fidelity(emb, dense_emb))
    row["top1_agreement"] = top1_agreement(emb, dense_emb)
    return row


@torch.no_grad()
def measure_speedup(
    model,
    batch: dict[str, Tensor],
    mode: str,
    threshold: float | list[float],
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Dense time / sparse time for the FFNs alone and for the whole encoder (median ratio)."""
    ffns = converted_ffns(model)
    inputs: list[Tensor] = []
    hooks = [f.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for f in ffns]
    set_mode(model, "dense")
    model(**batch)
    for h in hooks:
        h.remove()

    def run_ffns():
        for f, x in zip(ffns, inputs, strict=True):
            f(x)

    def run_model():
        model(**batch)

    def set_point(dense: bool):
        set_mode(model, "dense" if dense else mode)
        apply_threshold(model, threshold)

    out = {}
    for name, fn in (("ffn", run_ffns), ("encoder", run_model)):
        ratios = []
        for r in range(warmup + repeats):
            times = {}
            for dense in (True, False) if r % 2 == 0 else (False, True):
                set_point(dense)
                t0 = time.perf_counter()
                fn()
                times[dense] = time.perf_counter() - t0
            if r >= warmup:
                ratios.append(times[True] / times[False])
        out[f"{name}_speedup"] = statistics.median(ratios)
    set_point(False)
    return out


def environment() -> dict:
    import platform

    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


TABLE_COLUMNS = (
    ("num_experts", "E", "{}"),
    ("split", "split", "{}"),
    ("router", "router", "{}"),
    ("threshold", "t", lambda v: v if isinstance(v, str) else f"{v:g}"),
    ("experts_per_token", "experts/tok", "{:.2f}"),
    ("ffn_flop_fraction", "FFN FLOPs", "{:.1%}"),
    ("cos_mean", "cos mean", "{:.4f}"),
    ("cos_p5", "cos p5", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
)
SPEED_COLUMNS = (
    ("ffn_speedup", "FFN speedup", "{:.2f}x"),
    ("encoder_speedup", "encoder speedup", "{:.2f}x"),
)


def format_table(rows: list[dict], with_speed: bool) -> str:
    """The evaluation rows as a markdown table (no trailing newline); missing cells print "-"."""
    columns = TABLE_COLUMNS + (SPEED_COLUMNS if with_speed else ())
    return markdown_table(rows, columns).rstrip("\n")
