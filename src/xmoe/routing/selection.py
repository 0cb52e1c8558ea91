"""Selection machinery shared by the preference routers (threshold, top-k, Switch, GShard).

A preference router ranks the experts per token and keeps a prefix of that ranking. The ranking
is by the router probabilities, optionally shifted by a loss-free balancing bias; the keep rule
(threshold mass, or k) and the weights always use the unshifted probabilities. Null experts are
extra router outputs whose pairs are dropped before dispatch: they take probability mass (and
top-k slots) but cost no compute.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int, check_range
from .base import LinearRouter, Routing, pairs_from_sorted


def threshold_keep(
    sorted_probs: Tensor, threshold: float, max_experts: int | None = None
) -> Tensor:
    """XMoE threshold rule on probabilities listed in ranking order.

    Keep rank ``r`` iff the mass of the strictly higher-ranked experts is ``< threshold``. This is
    the smallest prefix whose mass reaches the threshold; rank 0 is always kept (its prefix mass is
    0). ``threshold >= 1`` keeps every rank exactly, so fp32 cumsum rounding can never drop the
    tail. ``max_experts`` caps the prefix length.

    Args:
        sorted_probs: ``[N, E]`` fp32, each row in ranking order (descending when unbiased).
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


def select_sorted(
    probs: Tensor,
    keep_fn,
    renormalize: bool,
    k: int | None = None,
    order_scores: Tensor | None = None,
) -> Routing:
    """Rank each token's experts, keep ranks where ``keep_fn(ranked_probs)``, build pairs.

    Args:
        probs: ``[N, E]`` fp32 router probabilities (weights and keep rule use these).
        keep_fn: the selection rule on the probabilities in ranking order.
        renormalize: divide the kept weights by their per-token sum.
        k: when given, only the top ``k`` are ranked (``torch.topk``) instead of all ``E``.
        order_scores: ``[N, E]`` scores that define the ranking (default: ``probs``).
    """
    num_experts = probs.shape[-1]
    scores = probs if order_scores is None else order_scores
    if k is None:
        order = scores.detach().argsort(dim=-1, descending=True, stable=True)
    else:
        order = scores.detach().topk(k, dim=-1, sorted=True).indices
    ranked = probs.gather(1, order)
    keep = keep_fn(ranked)
    weights = ranked
    if renormalize:
        kept_mass = (ranked * keep).sum(dim=-1, keepdim=True)
        weights = ranked / kept_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    return pairs_from_sorted(ranked, order, keep, num_experts, weights)


class PreferenceRouter(LinearRouter):
    """Base of routers that rank experts per token and keep a prefix (threshold, top-k, ...).

    Shared options:
        num_null_experts: Z extra router outputs that cost no compute (XMoE's placeholder /
            AdaMoE's null experts). Their probability mass counts toward the threshold and they
            take top-k slots; their pairs are dropped before dispatch. ``Routing.extras``
            reports ``null_fraction``, the fraction of tokens that selected at least one.
        loss_free_balance: DeepSeek-V3-style balancing without a loss: a per-expert bias
            (buffer ``selection_bias``) is added to the probabilities for *ranking only*, and
            after each training forward moves by ``bias_update_rate`` towards the experts whose
            load is below the mean (sign update, no gradient). With ``reduce_stats`` set the
            load is that of the global batch, so the buffer stays identical on every rank.
        bias_update_rate: step of that update. Default 1e-3 (DeepSeek-V3's gamma).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        num_null_experts: int = 0,
        loss_free_balance: bool = False,
        bias_update_rate: float = 1e-3,
        **kwargs,
    ) -> None:
        check_int("num_null_experts", num_null_experts, 0)
        super().__init__(d_model, num_experts, num_experts + num_null_experts, **kwargs)
        check_range("bias_update_rate", bias_update_rate, 0, math.inf)
        self.num_null_experts = num_null_experts
        self.loss_free_balance = bool(loss_free_balance)
        self.bias_update_rate = float(bias_update_rate)
        if self.loss_free_balance:
            self.register_buffer("selection_bias", torch.zeros(num_experts))

    def forward(self, x: Tensor, **kwargs) -> Routing:
        logits = self.logits(x)
        probs = self.selection_logits(x, logits).softmax(dim=-1)
        order_scores = None
        if self.loss_free_balance:
            bias = torch.cat([self.selection_bias, probs.new_zeros(self.num_null_experts)])
            order_scores = probs.detach() + bias
        routing = self.select(probs, order_scores)
        if self.num_null_experts:
            routing = self._drop_null_pairs(routing)
        routing.losses.update(self.standard_losses(logits, probs, routing))
        routing.losses.update(self.extra_losses(probs))
        if self.loss_free_balance and self.training:
            self._update_bias(routing)
        return routing

    def select(self, probs: Tensor, order_scores: Tensor | None = None) -> Routing:
        """``probs: [N, E + Z]`` → kept pairs (null experts included). Subclasses implement."""
        raise NotImplementedError  # pragma: no cover - interface

    def extra_losses(self, probs: Tensor) -> dict[str, Tensor]:
        """Router-specific losses beyond load balance and z-loss (default: none)."""
        return {}

    def _drop_null_pairs(self, routing: Routing) -> Routing:
        real = routing.expert_idx < self.num_experts
        hit = torch.zeros(routing.num_tokens, dtype=torch.bool, device=real.device)
        hit[routing.token_idx[~real]] = True
        out = routing.select(real)
        out.num_experts = self.num_experts
        out.num_selected = out.num_pairs  # null pairs are skipped, not dropped by capacity
        out.extras["null_fraction"] = hit.float().mean() if hit.numel() else hit.sum().float()
        return out

    @torch.no_grad()
    def _update_bias(self, routing: Routing) -> None:
        load = routing.expert_counts.float()
        if self.reduce_stats is not None:
            load = self.reduce_stats(load)
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
