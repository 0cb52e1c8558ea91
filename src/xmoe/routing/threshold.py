"""XMoE threshold router (Yang et al., 2024): a variable number of experts per token."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .._checks import check_int, check_positive, check_range
from .base import Routing
from .budget import BudgetController
from .losses import entropy_loss, threshold_soft_count
from .selection import PreferenceRouter, select_sorted, threshold_keep


class ThresholdRouter(PreferenceRouter):
    """Keep the smallest set of top experts whose softmax mass reaches ``threshold``.

    p = softmax(x @ W.T) in fp32; experts are sorted by p; the expert at rank r is kept iff the
    mass of the strictly higher-ranked experts is < t. Easy (peaked) tokens use one expert, hard
    (flat) tokens use several. At t = 1 every expert is kept (dense-equivalent).

    Args:
        threshold: t in (0, 1]. Default 0.9, the XMoE paper's main setting.
        max_experts: optional cap on experts per token, in [1, E].
        renormalize: combine with p_e / sum(kept p) instead of p_e. Default False: the paper
            combines with the raw probabilities, so a token's output scale tracks its confidence.
        soft_count_temperature: temperature of the ``soft_count`` sparsity loss. Default 0.05.
        target_experts_per_token: a compute budget. When set, a :class:`BudgetController`
            steers t during training so that the mean experts/token reaches this value
            (``threshold`` is then only the starting point); eval uses the t reached. The
            controller's state is in the router's buffers, so checkpoints resume it exactly.
            Routings carry the t in use as ``extras["threshold"]``.
        budget_gain: the controller's integral gain (its proportional gain is 4x). Default 0.05.
        init_std: router weight init std. Default ``3 / sqrt(d_model)``: logits start with std
            about 3 for unit-variance inputs. A near-uniform start (std 0.02) makes t = 0.9 keep
            ~90% of the experts and training only slowly sparsifies it: on the demo GPT
            (16 experts, 300 steps) 0.02 ended at ~12 experts/token, 0.3 (= 3.4/sqrt(128)) at
            ~4.4 with lower val loss.
        **kwargs: see :class:`PreferenceRouter` (null experts, loss-free balancing) and
            :class:`LinearRouter`.

    Losses: ``load_balance``, ``z_loss`` and two sparsity regularisers (coefficient 0 unless
    set in ``loss_coefs``): ``entropy`` (mean entropy of p) and ``soft_count`` (a differentiable
    estimate of the number of experts needed to reach t).
    """

    default_loss_coefs = {"load_balance": 0.01, "z_loss": 0.001, "entropy": 0.0, "soft_count": 0.0}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        threshold: float = 0.9,
        max_experts: int | None = None,
        renormalize: bool = False,
        soft_count_temperature: float = 0.05,
        target_experts_per_token: float | None = None,
        budget_gain: float = 0.05,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        check_range("threshold", threshold, 0, 1, low_open=True)
        if max_experts is not None:
            check_int("max_experts", max_experts, 1, num_experts)
        check_positive("soft_count_temperature", soft_count_temperature)
        self.threshold = float(threshold)
        self.max_experts = max_experts
        self.renormalize = bool(renormalize)
        self.soft_count_temperature = float(soft_count_temperature)
        self.budget = None
        if target_experts_per_token is not None:
            self.budget = BudgetController(
                target_experts_per_token,
                num_experts,
                init_threshold=min(self.threshold, 1.0 - 1e-6),
                gain_i=budget_gain,
                gain_p=4 * budget_gain,
            )

    @staticmethod
    def default_init_std(d_model: int) -> float:
        return 3.0 / math.sqrt(d_model)

    def forward(self, x: Tensor, **kwargs) -> Routing:
        if self.budget is None:
            return super().forward(x, **kwargs)
        self.threshold = self.budget.threshold
        routing = super().forward(x, **kwargs)
        routing.extras["threshold"] = torch.tensor(self.threshold, dtype=torch.float64)
        if self.training:
            self.budget.update(self._global_rate(routing))
        return routing

    def _global_rate(self, routing: Routing) -> float:
        """Experts per token over the global batch (``reduce_stats``), so every rank steers
        its copy of t by the same figure and the copies stay equal."""
        if self.reduce_stats is None:
            return routing.experts_per_token
        counts = torch.tensor(
            [float(routing.num_pairs), float(routing.num_tokens)],
            dtype=torch.float64,
            device=routing.token_idx.device,
        )
        pairs, tokens = self.reduce_stats(counts).tolist()
        return pairs / max(tokens, 1.0)

    def select(self, probs: Tensor, order_scores: Tensor | None = None) -> Routing:
        keep_fn = partial(threshold_keep, threshold=self.threshold, max_experts=self.max_experts)
        return select_sorted(probs, keep_fn, self.renormalize, order_scores=order_scores)

    def extra_losses(self, probs: Tensor) -> dict[str, Tensor]:
        ranked = probs.sort(dim=-1, descending=True).values
        return {
            "entropy": entropy_loss(probs),
            "soft_count": threshold_soft_count(ranked, self.threshold, self.soft_count_temperature),
        }

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, threshold={self.threshold}, "
            f"max_experts={self.max_experts}, renormalize={self.renormalize}, "
            f"num_null_experts={self.num_null_experts}, loss_free_balance={self.loss_free_balance}"
            + ("" if self.budget is None else f", target_experts_per_token={self.budget.target}")
        )
