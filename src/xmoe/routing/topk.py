"""Top-k family: top-k (Shazeer 2017 style, optionally noisy), Switch (top-1) and GShard (top-2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .base import Routing
from .selection import PreferenceRouter, select_sorted


class TopKRouter(PreferenceRouter):
    """Keep each token's ``k`` most probable experts.

    Args:
        k: experts per token, in [1, E + num_null_experts]. Default 2 (GShard / Mixtral).
        renormalize: combine with the top-k probabilities renormalised to sum to 1 (GShard,
            Mixtral) instead of the raw softmax probabilities. Default False.
        noisy: Shazeer's noisy gating. In training only, the selection logits become
            ``H = x W_g + eps * softplus(x W_noise)`` with ``eps ~ N(0, 1)`` and a learned
            ``W_noise`` (init zero, so noise starts at softplus(0) = 0.69 std). The
            ``noisy_topk`` router adds the paper's importance and load losses.
        **kwargs: see :class:`PreferenceRouter` and :class:`LinearRouter`. ``k=1`` with the
            default top-1 load-balance loss is the Switch router.
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
        check_int("k", k, 1, self.num_outputs)
        self.k = k
        self.renormalize = bool(renormalize)
        self.noisy = bool(noisy)
        if self.noisy:
            self.noise_weight = nn.Parameter(torch.zeros(self.num_outputs, d_model))

    def selection_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        if not (self.noisy and self.training):
            return logits
        with torch.autocast(device_type=x.device.type, enabled=False):
            noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
        return logits + torch.randn_like(logits) * noise_std

    def select(self, probs: Tensor, order_scores: Tensor | None = None) -> Routing:
        keep_all = lambda ranked: torch.ones_like(ranked, dtype=torch.bool)
        return select_sorted(probs, keep_all, self.renormalize, k=self.k, order_scores=order_scores)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"renormalize={self.renormalize}, noisy={self.noisy}, "
            f"num_null_experts={self.num_null_experts}, loss_free_balance={self.loss_free_balance}"
        )


class SwitchRouter(TopKRouter):
    """Switch Transformer (Fedus et al., 2021): top-1, weight = the expert's probability.

    Defaults from the paper: capacity factor 1.25 in training (the layer uses it when its
    ``capacity_factor`` is None), load-balance coefficient 0.01, and the router weight
    initialised at one tenth of the usual scale (std ``sqrt(0.1 / d_model)``) for stability.
    """

    default_capacity_factor = 1.25

    def __init__(self, d_model: int, num_experts: int, **kwargs) -> None:
        kwargs.setdefault("k", 1)
        super().__init__(d_model, num_experts, **kwargs)

    @staticmethod
    def default_init_std(d_model: int) -> float:
        return math.sqrt(0.1 / d_model)


class GShardRouter(TopKRouter):
    """GShard (Lepikhin et al., 2020): top-2, weights renormalised over the pair.

    In training only, the second expert is kept with probability ``min(1, 2 * g2)`` where g2 is
    its renormalised weight ("random routing"): a token whose second choice is weak skips it.
    The first expert keeps its weight g1 (no renormalisation after the drop).

    Args:
        random_routing: enable the stochastic second expert. Default True.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, random_routing: bool = True, **kwargs
    ) -> None:
        kwargs.setdefault("k", 2)
        kwargs.setdefault("renormalize", True)
        super().__init__(d_model, num_experts, **kwargs)
        self.random_routing = bool(random_routing)

    def select(self, probs: Tensor, order_scores: Tensor | None = None) -> Routing:
        routing = super().select(probs, order_scores)
        if not (self.training and self.random_routing):
            return routing
        second = routing.rank == 1
        draw = torch.rand_like(routing.score)
        keep = ~second | (draw < 2 * routing.weight.detach())
        out = routing.select(keep)
        out.num_selected = out.num_pairs  # random routing is selection, not a capacity drop
        return out
