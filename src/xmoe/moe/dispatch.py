"""Capacity policy and the permute / unpermute halves of dispatch.

    permute:   kept pairs --sort by expert--> contiguous per-expert segments of gathered rows
    [experts]  grouped compute over the segments (experts.py)
    unpermute: scale rows by their combine weight (or let the experts do it, folded into their
               hidden rows) and index_add them back to their tokens

Keeping the two halves separate leaves the slot where an expert-parallel all-to-all goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..routing.base import Routing


def expert_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    """Per-expert capacity ``C = ceil(capacity_factor * N / E)``."""
    check_capacity_factor("capacity_factor", capacity_factor)
    return math.ceil(capacity_factor * num_tokens / num_experts)


def check_capacity_factor(name: str, value: float | None) -> None:
    """``None`` (dropless) or a finite float > 0."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be None, 'dropless' or a number > 0, got {value!r}")


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Drop pairs beyond ``capacity`` per expert, deterministically.

    Within each expert, pairs are admitted by priority: lower rank first, then higher router
    score, then lower token index. A token whose pairs are all dropped gets a zero MoE output
    (the model's residual carries it). ``capacity >= N`` never drops anything.
    """
    if routing.num_pairs == 0:
        return routing
    # Lexicographic sort via successive stable sorts, least significant key first.
    order = torch.argsort(routing.token_idx, stable=True)
    order = order[torch.argsort(-routing.score[order], stable=True)]
    order = order[torch.argsort(routing.rank[order], stable=True)]
    order = order[torch.argsort(routing.expert_idx[order], stable=True)]
    experts_sorted = routing.expert_idx[order]
    counts = torch.bincount(experts_sorted, minlength=routing.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(routing.num_pairs, device=order.device) - starts[experts_sorted]
    keep = torch.empty_like(position, dtype=torch.bool)
    keep[order] = position < capacity
    return routing.select(keep)


@dataclass
class DispatchPlan:
    """Pairs sorted by expert. All tensors are ``[A]`` except ``counts: [E]``."""

    token_idx: Tensor
    expert_idx: Tensor
    weight: Tensor
    counts: Tensor
    num_tokens: int


def plan_dispatch(routing: Routing) -> DispatchPlan:
    """Sort the kept pairs by expert (stable, so token order is kept within a segment)."""
    order = torch.argsort(routing.expert_idx, stable=True)
    expert_idx = routing.expert_idx[order]
    return DispatchPlan(
        token_idx=routing.token_idx[order],
        expert_idx=expert_idx,
        weight=routing.weight[order],
        counts=torch.bincount(expert_idx, minlength=routing.num_experts),
        num_tokens=routing.num_tokens,
    )


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather ``x: [N, d]`` into expert-contiguous rows ``[A, d]``."""
    return x.index_select(0, plan.token_idx)


def unpermute(y: Tensor, plan: DispatchPlan, weighted: bool = False) -> Tensor:
    """Combine ``y: [A, d]`` back to ``[N, d]``: ``out[t] = sum_pairs weight * y``.

    ``weighted=True`` means the rows already carry their combine weight (the experts applied
    it), so only the sum remains. The sum runs in fp32 (the weights' dtype) whatever the expert
    compute dtype was.
    """
    y = y.to(plan.weight.dtype)
    if not weighted:
        y = y * plan.weight.unsqueeze(-1)
    out = y.new_zeros(plan.num_tokens, y.shape[-1])
    return out.index_add(0, plan.token_idx, y)
