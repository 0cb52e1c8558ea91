"""Selection rules shared by the routers: which ranks of each token's sorted preferences to keep."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Routing, pairs_from_sorted


def threshold_keep(
    sorted_probs: Tensor, threshold: float, max_experts: int | None = None
) -> Tensor:
    """XMoE threshold rule on descending-sorted probabilities.

    Keep rank ``r`` iff the mass of the strictly higher-ranked experts is ``< threshold``. This is
    the smallest prefix whose mass reaches the threshold; rank 0 is always kept (its prefix mass is
    0). ``threshold >= 1`` keeps every rank exactly, so fp32 cumsum rounding can never drop the
    tail. ``max_experts`` caps the prefix length.

    Args:
        sorted_probs: ``[N, E]`` fp32, each row sorted descending.
    Returns:
        ``[N, E]`` bool keep mask.
    """
    if threshold >= 1.0:
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    else:
        mass_before = sorted_probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(mass_before[:, :1]), mass_before[:, :-1]], -1)
        keep = mass_before < threshold
    if max_experts is not None and max_experts < keep.shape[-1]:
        keep[:, max_experts:] = False
    return keep


def select_sorted(probs: Tensor, keep_fn, renormalize: bool, k: int | None = None) -> Routing:
    """Sort each token's probabilities, keep ranks where ``keep_fn(sorted_probs)``, build pairs.

    Args:
        probs: ``[N, E]`` fp32 router probabilities.
        keep_fn: the selection rule on the sorted probabilities.
        renormalize: divide the kept weights by their per-token sum.
        k: when given, only the top ``k`` are sorted (``torch.topk``) instead of all ``E``.
    """
    num_experts = probs.shape[-1]
    if k is None:
        sorted_probs, sorted_experts = probs.sort(dim=-1, descending=True, stable=True)
    else:
        sorted_probs, sorted_experts = probs.topk(k, dim=-1, sorted=True)
    keep = keep_fn(sorted_probs)
    weights = sorted_probs
    if renormalize:
        kept_mass = (sorted_probs * keep).sum(dim=-1, keepdim=True)
        weights = sorted_probs / kept_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    return pairs_from_sorted(sorted_probs, sorted_experts, keep, num_experts, weights)
