"""Deterministic evaluation: fixed val windows, eval mode (dropless by default)."""

from __future__ import annotations

import math

import torch

from ..data.dataset import TokenData
from ..models.gpt import GPT, routing_summary


@torch.no_grad()
def evaluate(model: GPT, data: TokenData, batch_size: int, max_tokens: int | None = None) -> dict:
    """Val loss/perplexity and token-weighted routing stats over fixed val windows.

    Eval mode uses ``eval_capacity_factor`` (dropless by default), so the result does not depend
    on ``batch_size``.
    """
    was_training = model.training
    model.eval()
    cfg = model.cfg
    total_loss, total_tokens = 0.0, 0
    n_moe = len(model.moe_layers)
    pairs = [0] * n_moe
    selected = [0] * n_moe
    loads = [torch.zeros(m.num_experts, dtype=torch.long) for m in model.moe_layers]
    extras: list[dict[str, float]] = [{} for _ in range(n_moe)]  # token-weighted sums
    for x, y in data.val_batches(batch_size, cfg.block_size, max_tokens):
        out = model(x, y)
        n = y.numel()
        total_loss += out.lm_loss.item() * n
        total_tokens += n
        for i, r in enumerate(out.routings):
            pairs[i] += r.num_pairs
            selected[i] += r.num_selected or 0
            loads[i] += r.expert_counts.cpu()
            for name, value in r.extras.items():
                extras[i][name] = extras[i].get(name, 0.0) + float(value) * r.num_tokens
    model.train(was_training)
    loss = total_loss / total_tokens
    summary = routing_summary(
        cfg,
        model.moe_layers,
        [p / total_tokens for p in pairs],
        [1 - p / s if s else 0.0 for p, s in zip(pairs, selected)],
    )
    summary["load_imbalance"] = [load_imbalance(c) for c in loads]
    summary["expert_load"] = [c.tolist() for c in loads]
    for name in sorted({k for layer in extras for k in layer}):
        summary[name] = [layer.get(name, 0.0) / total_tokens for layer in extras]
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_tokens": total_tokens,
        **{f"val_{k}": v for k, v in summary.items()},
    }


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean of per-expert pair counts: 1 is perfectly balanced, E is full collapse."""
    mean = counts.float().mean()
    return float(counts.max() / mean) if mean > 0 else float("nan")
