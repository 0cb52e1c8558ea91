"""Top-k router: Shazeer 2017 (optionally noisy), GShard/Mixtral (renormalised), Switch (k=1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LinearRouter, Routing, _check_int
from .selection import select_sorted


class TopKRouter(LinearRouter):
    """Keep each token's ``k`` most probable experts.

    Args:
        k: experts per token, in [1, E]. Default 2 (GShard / Mixtral).
        renormalize: combine with the top-k probabilities renormalised to sum to 1 (GShard,
            Mixtral) instead of the raw softmax probabilities. Default False.
        noisy: Shazeer's noisy gating. In training only, the selection logits become
            ``H = x W_g + eps * softplus(x W_noise)`` with ``eps ~ N(0, 1)`` and a learned
            ``W_noise`` (init zero, so noise starts at softplus(0) = 0.69 std).
        **kwargs: see :class:`LinearRouter`. ``k=1`` with the default top-1 load-balance loss is
            the Switch router.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        renormalize: bool = False,
        noisy: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        _check_int("k", k, 1, num_experts)
        self.k = k
        self.renormalize = bool(renormalize)
        self.noisy = bool(noisy)
        if self.noisy:
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def selection_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        if not (self.noisy and self.training):
            return logits
        with torch.autocast(device_type=x.device.type, enabled=False):
            noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
        return logits + torch.randn_like(logits) * noise_std

    def select(self, probs: Tensor) -> Routing:
        keep_all = lambda sorted_probs: torch.ones_like(sorted_probs, dtype=torch.bool)
        return select_sorted(probs, keep_all, self.renormalize, k=self.k)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"renormalize={self.renormalize}, noisy={self.noisy}"
        )
