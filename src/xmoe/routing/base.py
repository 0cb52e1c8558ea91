"""The router interface: every gate turns token features into a ragged list of assignments.

A :class:`Routing` is the one currency between the router, the capacity policy, the dispatcher
and the combine step. It never holds a dense ``[tokens, experts, capacity]`` tensor: it holds one
entry per *kept* (token, expert) pair, so top-k (k pairs per token), threshold (1..E pairs per
token), Expert Choice (0..E) and hash (1) all look the same downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_positive
from .losses import load_balance_loss, z_loss

StatsReduction = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks that share one batch (differentiable), e.g.
``functools.partial(xmoe.distributed.all_reduce_sum, group=group)``."""


@dataclass
class Routing:
    """Kept (token, expert) pairs for one forward call.

    Attributes:
        token_idx: ``[A]`` int64, row of the flattened input ``[N, d_model]`` each pair reads.
        expert_idx: ``[A]`` int64, expert each pair runs on, in ``[0, num_experts)``.
        weight: ``[A]`` fp32, combine weight of the pair (differentiable w.r.t. the router).
        rank: ``[A]`` int64, position of the expert in the token's preference order (0 = best).
        score: ``[A]`` fp32, the router probability of the pair, used as the capacity tie-break
            (lower rank first, then higher score). Detached.
        num_tokens: N, the number of flattened tokens routed.
        num_experts: E.
        losses: named *unweighted* scalar losses this router asks for (the model weights them).
        num_selected: pairs the router selected before any capacity drop.
        extras: router-specific scalar statistics (e.g. ``null_fraction``), as tensors.
    """

    token_idx: Tensor
    expert_idx: Tensor
    weight: Tensor
    rank: Tensor
    score: Tensor
    num_tokens: int
    num_experts: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    num_selected: int | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_selected is None:
            self.num_selected = self.num_pairs

    @property
    def num_pairs(self) -> int:
        """A, the number of kept pairs."""
        return int(self.token_idx.shape[0])

    @property
    def experts_per_token(self) -> float:
        """Mean number of kept experts per token (A / N)."""
        return self.num_pairs / max(self.num_tokens, 1)

    @property
    def expert_counts(self) -> Tensor:
        """``[E]`` int64, number of kept pairs per expert."""
        return torch.bincount(self.expert_idx, minlength=self.num_experts)

    @property
    def dropped_fraction(self) -> float:
        """Fraction of selected pairs dropped by the capacity policy (0 when dropless)."""
        sel = self.num_selected or 0
        return 0.0 if sel == 0 else 1.0 - self.num_pairs / sel

    def select(self, keep: Tensor) -> Routing:
        """A new Routing with only the pairs where ``keep`` (``[A]`` bool, or int index) holds."""
        return replace(
            self,
            token_idx=self.token_idx[keep],
            expert_idx=self.expert_idx[keep],
            weight=self.weight[keep],
            rank=self.rank[keep],
            score=self.score[keep],
            extras=dict(self.extras),
        )

    def stats(self) -> dict[str, float | list[int]]:
        """Host-side summary (syncs): experts/token, per-expert counts, dropped fraction."""
        return {
            "experts_per_token": self.experts_per_token,
            "expert_counts": self.expert_counts.tolist(),
            "dropped_fraction": self.dropped_fraction,
        }


class Router(nn.Module):
    """Base class of all routers.

    A router maps ``x: [N, d_model]`` to a :class:`Routing`. Subclasses implement
    :meth:`forward`. Routers always compute their scores in fp32, even under autocast.

    Class attributes a router may override:
        uses_token_ids: the router needs ``token_ids`` (``[N]`` input ids) in ``forward``.
        default_loss_coefs: the paper's coefficient for each loss it reports; the model config's
            ``loss_coefs`` override them by name.
        default_capacity_factor: training capacity factor used when the layer's
            ``capacity_factor`` is left at None (None: dropless).

    Instance attribute:
        reduce_stats: how the router's batch statistics become global (:data:`StatsReduction`:
            sum a tensor over the ranks sharing the batch). None (default): the statistics are
            those of the local tokens, as in a single process. Expert parallelism sets it (see
            ``xmoe.distributed.use_global_router_stats``); routers that have no such statistics
            ignore it.
    """

    num_experts: int
    uses_token_ids: bool = False
    default_loss_coefs: dict[str, float] = {}
    default_capacity_factor: float | None = None
    reduce_stats: StatsReduction | None = None

    def forward(self, x: Tensor, **kwargs) -> Routing:  # pragma: no cover - interface
        raise NotImplementedError


class LinearRouter(Router):
    """A router whose scores are ``logits = x @ weight.T`` with ``weight: [E, d_model]``, no bias.

    ``num_outputs`` (not a user option) lets a subclass score extra outputs, e.g. null experts:
    ``weight`` is then ``[num_outputs, d_model]``.

    The selection rule is left to subclasses (:meth:`select`). This class owns the shared parts:
    fp32 scores outside autocast, the NaN/inf check and the standard losses.

    Args:
        d_model: input feature size.
        num_experts: E, number of router outputs.
        init_std: std of the normal init of ``weight``. Default 0.02 (GPT-2 style init).
            Routers whose selection depends on how peaked p is (threshold) choose another default.
        balance_over: ``"top1"`` computes the load-balance f_e from each token's top-1 expert as in
            Switch / the XMoE paper; ``"kept"`` uses all kept pairs.
        check_finite: raise ``ValueError`` when the router scores hold NaN or inf (one host sync).

    With :attr:`~Router.reduce_stats` set, the training ``load_balance`` loss counts ``f_e`` and
    ``P_e`` over the tokens of every rank (:func:`~xmoe.routing.losses.load_balance_loss`); in
    eval it stays local (no collective, so ranks may evaluate alone).
    """

    # 0.01: the Switch / XMoE load-balance coefficient; 0.001: the ST-MoE z-loss coefficient.
    default_loss_coefs = {"load_balance": 0.01, "z_loss": 0.001}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_outputs: int | None = None,
        *,
        init_std: float | None = None,
        balance_over: str = "top1",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        check_choice("balance_over", balance_over, ("top1", "kept"))
        if init_std is None:
            init_std = self.default_init_std(d_model)
        check_positive("init_std", init_std)
        self.d_model = d_model
        self.num_experts = num_experts
        self.balance_over = balance_over
        self.check_finite = check_finite
        self.init_std = init_std
        self.num_outputs = num_experts if num_outputs is None else num_outputs
        self.weight = nn.Parameter(torch.empty(self.num_outputs, d_model))
        self.reset_parameters()

    @staticmethod
    def default_init_std(d_model: int) -> float:
        return 0.02

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def logits(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → fp32 ``[N, E]`` router logits, computed outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise ValueError(
                "router scores contain NaN or inf: the MoE input x (or the router weight) is not "
                "finite; expected finite values"
            )
        return logits

    def forward(self, x: Tensor, **kwargs) -> Routing:
        logits = self.logits(x)
        probs = self.selection_logits(x, logits).softmax(dim=-1)
        routing = self.select(probs)
        routing.losses.update(self.standard_losses(logits, probs, routing))
        return routing

    def selection_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        """Logits the selection and weights use; the default is the clean logits."""
        return logits

    def select(self, probs: Tensor) -> Routing:  # pragma: no cover - interface
        """``probs: [N, E]`` fp32 → the kept pairs. Subclasses implement the selection rule."""
        raise NotImplementedError

    def standard_losses(self, logits: Tensor, probs: Tensor, routing: Routing) -> dict[str, Tensor]:
        """Load balance over the first E (real) outputs, and the z-loss over all logits."""
        probs = probs[:, : self.num_experts]
        top1 = self.balance_over == "top1"
        assigned = probs.argmax(dim=-1) if top1 else routing.expert_idx
        reduce = self.reduce_stats if self.training else None
        return {
            "load_balance": load_balance_loss(probs, assigned, reduce),
            "z_loss": z_loss(logits),
        }


def pairs_from_sorted(
    sorted_probs: Tensor,
    sorted_experts: Tensor,
    keep: Tensor,
    num_experts: int,
    weights: Tensor | None = None,
) -> Routing:
    """Build a Routing from per-token sorted preferences and a keep mask.

    Args:
        sorted_probs: ``[N, E']`` fp32, each token's probabilities in descending order.
        sorted_experts: ``[N, E']`` int64, the experts in that order.
        keep: ``[N, E']`` bool, which ranks are kept.
        num_experts: E', recorded on the Routing.
        weights: ``[N, E']`` combine weights (defaults to ``sorted_probs``).

    Pairs come out token-major, rank-minor.
    """
    n = sorted_probs.shape[0]
    token_idx, rank = keep.nonzero(as_tuple=True)
    w = sorted_probs if weights is None else weights
    return Routing(
        token_idx=token_idx,
        expert_idx=sorted_experts[token_idx, rank],
        weight=w[token_idx, rank],
        rank=rank,
        score=sorted_probs[token_idx, rank].detach(),
        num_tokens=n,
        num_experts=num_experts,
    )
