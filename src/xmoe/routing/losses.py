"""Router auxiliary losses. Each returns an unweighted scalar; coefficients live in the config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def load_balance_loss(
    probs: Tensor, assigned: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Switch / XMoE load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: ``[N, E]`` fp32 router probabilities (carries the gradient, through ``P_e``).
        assigned: ``[M]`` int64 expert of each counted assignment (each token's top-1 expert, or
            every kept pair). ``f_e`` is the fraction of those assignments that went to ``e``.
        reduce: None (default): ``f`` and ``P`` over these tokens. Otherwise a differentiable
            sum over the ranks that share the batch (``Router.reduce_stats``): the per-expert
            counts and probability sums, and the token and assignment totals, are summed over
            them in one call (``2E + 2`` floats), so with equal-size shards the value and the
            (DP-averaged) gradient equal the single-process loss on the concatenated batch.

    Equals 1 under a perfectly uniform load and ``E`` when every token and all mass collapse
    onto one expert.
    """
    num_experts = probs.shape[-1]
    if reduce is not None:
        counts = torch.bincount(assigned, minlength=num_experts).to(probs.dtype)
        sizes = probs.new_tensor([assigned.numel(), probs.shape[0]])
        stats = reduce(torch.cat([probs.sum(0), counts, sizes]))
        prob_sum, counts = stats[:num_experts], stats[num_experts:-2].detach()
        m, n = stats[-2].detach().clamp_min(1), stats[-1].detach().clamp_min(1)  # 0 tokens: 0
        return num_experts * (counts / m * prob_sum / n).sum()
    if probs.shape[0] == 0 or assigned.numel() == 0:
        return probs.sum() * 0.0
    f = torch.bincount(assigned, minlength=num_experts).to(probs.dtype) / assigned.numel()
    p_mean = probs.mean(dim=0)
    return num_experts * (f * p_mean).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_i (logsumexp_e logits_ie)^2``; keeps logits small and stable.

    ``logits: [N, E]`` fp32. Zero logits give ``(ln E)^2``.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation ``var / mean^2`` of a ``[E]`` vector (Shazeer 2017).

    Zero for a perfectly even vector; 0 when E == 1.
    """
    values = values.float()
    if values.numel() <= 1:
        return values.sum() * 0.0
    return values.var() / (values.mean().square() + 1e-10)


def threshold_soft_count(sorted_probs: Tensor, threshold: float, temperature: float) -> Tensor:
    """Differentiable estimate of the experts a token needs to reach ``threshold``.

    ``sum_r sigmoid((t - mass_before_r) / temperature)`` over the descending-sorted ``[N, E]``
    probabilities, averaged over tokens: the hard count replaces the sigmoid with a step.
    Minimising it concentrates mass on the top experts so fewer are needed.
    """
    if sorted_probs.shape[0] == 0:
        return sorted_probs.sum() * 0.0
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.sigmoid((threshold - mass_before) / temperature).sum(dim=-1).mean()


def entropy_loss(probs: Tensor) -> Tensor:
    """Mean per-token entropy of the router distribution ``[N, E]`` (lower = more peaked)."""
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
