"""Router auxiliary losses. Each returns an unweighted scalar; coefficients live in the config."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(probs: Tensor, assigned: Tensor) -> Tensor:
    """Switch / XMoE load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: ``[N, E]`` fp32 router probabilities (carries the gradient, through ``P_e``).
        assigned: ``[M]`` int64 expert of each counted assignment (each token's top-1 expert, or
            every kept pair). ``f_e`` is the fraction of those assignments that went to ``e``.

    Equals 1 under a perfectly uniform load and ``E`` when every token and all mass collapse
    onto one expert.
    """
    num_experts = probs.shape[-1]
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
