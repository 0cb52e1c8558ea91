"""The slice router: which neuron slices (experts) of a converted FFN a token keeps.

Per token, keep the smallest set of top experts whose *share* reaches the threshold t (XMoE's
rule, :func:`xmoe.routing.selection.threshold_keep`), each with weight 1: an expert is a slice of
the dense FFN, not a mixture component, so ``t = 1`` reproduces the dense FFN exactly.

The share is ``softmax(x Wrᵀ + br)`` (``score="softmax"``: a linear router fitted to the oracle
share), ``sigmoid(x Wrᵀ + br)`` normalised to sum to 1 (``score="sigmoid"``: a per-expert
predictor of whether the oracle keeps the expert, Deja Vu style), or a share the caller passes in
(the oracle's true activation mass, :meth:`ConvertedFFN.oracle_share`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_range
from ..routing import Router, Routing
from ..routing.base import pairs_from_sorted
from ..routing.selection import threshold_keep

SCORES = ("softmax", "sigmoid")


def check_threshold(threshold: float) -> float:
    """t in (0, 1], as a float."""
    return float(check_range("threshold", threshold, 0.0, 1.0, low_open=True))


def threshold_routing(share: Tensor, threshold: float) -> Routing:
    """XMoE threshold rule with unit weights.

    ``share: [N, E]`` fp32 rows summing to 1. Per token, keep the smallest set of top experts
    whose share reaches ``threshold`` (at least one; all at ``threshold >= 1``). Every kept pair
    gets weight 1: an expert is a slice of the dense FFN, not a mixture component.
    """
    order = share.argsort(dim=-1, descending=True, stable=True)
    ranked = share.gather(1, order)
    keep = threshold_keep(ranked, threshold)
    return pairs_from_sorted(ranked, order, keep, share.shape[-1], torch.ones_like(ranked))


class SliceRouter(Router):
    """Threshold routing over neuron slices with unit weights; no losses.

    Args:
        d_model: input width.
        num_experts: E.
        threshold: t in (0, 1].
        score: ``softmax`` (the share is a softmax of the logits) or ``sigmoid`` (per-expert
            keep probabilities, normalised to sum to 1 for the keep rule).

    Parameters: ``weight [E, d_model]`` and ``bias [E]`` (``nn.Linear`` layout), zero at init
    (a uniform share until :func:`~xmoe.convert.convert.fit_router` fits them).
    """

    def __init__(
        self, d_model: int, num_experts: int, threshold: float = 1.0, score: str = "softmax"
    ) -> None:
        super().__init__()
        self.score = check_choice("score", score, SCORES)
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        self.d_model, self.num_experts = d_model, num_experts
        self.threshold = check_threshold(threshold)
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def set_threshold(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)

    def logits(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → fp32 ``[N, E]`` router logits, computed outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), self.bias.float())

    def share(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → ``[N, E]`` fp32 predicted share (rows sum to 1). At t >= 1
        every expert is kept whatever the scores, so the router is not run."""
        if self.threshold >= 1.0:
            return x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts).float()
        z = self.logits(x)
        if self.score == "softmax":
            return z.softmax(dim=-1)
        p = z.sigmoid()
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)

    def forward(self, x: Tensor, share: Tensor | None = None) -> Routing:
        """Route ``x: [N, d_model]`` by ``share`` (``[N, E]``, e.g. the oracle's), or by the
        router's own prediction when None."""
        return threshold_routing(self.share(x) if share is None else share, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, "
            f"threshold={self.threshold}, score={self.score!r}"
        )
