"""The expert-parallel MoE layer, and router statistics over the global batch.

:class:`ExpertParallelMoE` is an :class:`~xmoe.MoE` whose ``experts`` hold only this rank's
contiguous slice of ``E / P`` experts. Its forward is the single-process pipeline with the
exchange in the dispatch slot::

    router (local tokens) → capacity → plan_dispatch → permute
      → exchange per-expert counts (all_to_all of [P * E/P] int64)
      → all_to_all of the rows (variable splits; rows are sorted by expert, so by owner rank)
      → regroup received rows by local expert → Experts.forward on the local slice
      → reverse all_to_all → unpermute (weights, index_add) on the owning rank

Experts are numbered globally; rank i of the EP group owns ``[i*E/P, (i+1)*E/P)``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..moe.dispatch import DispatchPlan, permute, unpermute
from ..moe.experts import Experts
from ..moe.layer import MoE
from ..routing import Router, load_balance_loss
from .collectives import all_reduce_sum, all_to_all, exchange_counts


class ExpertParallelMoE(MoE):
    """An :class:`~xmoe.MoE` sharded over the ranks of ``group`` (EP size P = group size).

    Build it with :meth:`from_moe` from a single-process layer built identically on every rank:
    the router (replicated) is shared with it, the experts are this rank's slice of its
    experts. ``num_experts`` stays the global E (routing, capacity and stats are global-id);
    ``experts.num_experts`` is the local ``E / P``.

    Capacity (when a capacity factor is set) is applied per rank to the rank's own tokens, with
    ``C = ceil(cf * N_local / E)`` (GShard's per-group capacity), so it equals the
    single-process layer's only in the dropless case.
    """

    def __init__(
        self,
        moe: MoE,
        group: ProcessGroup | None,
        ep_size: int,
        ep_rank: int,
    ) -> None:
        if moe.num_experts % ep_size:
            raise ValueError(
                f"num_experts={moe.num_experts} is not divisible by the expert-parallel size "
                f"{ep_size}: each rank must hold the same number of experts"
            )
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")
        local = moe.num_experts // ep_size
        # MoE registers experts, then router, so parameters() (optimizer parameter ids and
        # checkpoint names) line up with the single-process model.
        super().__init__(
            moe.d_model,
            moe.num_experts,
            moe.d_expert,
            router=moe.router,
            capacity_factor=_as_argument(moe.capacity_factor),
            eval_capacity_factor=_as_argument(moe.eval_capacity_factor),
            experts=expert_slice(moe.experts, ep_rank * local, local),
        )
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = local
        self.expert_offset = ep_rank * local

    @classmethod
    def from_moe(cls, moe: MoE, group: ProcessGroup | None = None) -> ExpertParallelMoE:
        """Shard ``moe`` over ``group`` (default: the world): this rank keeps its slice."""
        return cls(moe, group, dist.get_world_size(group), dist.get_rank(group))

    def dispatch_and_combine(self, flat: Tensor, plan: DispatchPlan) -> Tensor:
        """permute → all-to-all → local experts → reverse all-to-all → unpermute. Every rank of
        the group must call the layer (with any number of tokens, including 0)."""
        y = self.expert_exchange(permute(flat, plan), plan.counts)
        return unpermute(y, plan)

    def expert_exchange(self, rows: Tensor, counts: Tensor) -> Tensor:
        """Send ``rows: [A, d]`` (sorted by global expert, ``counts: [E]``) to the ranks owning
        their experts, run the local experts on what arrives, return the outputs ``[A, d]`` in
        the order of ``rows``."""
        p, local = self.ep_size, self.num_local_experts
        recv_counts = exchange_counts(counts, self.group)  # [P, L]: from rank s, per local expert
        # The one host sync: all_to_all and the grouped GEMM need Python split sizes.
        sizes = torch.cat([counts.view(p, local).sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = sizes[:p], sizes[p:]
        received = all_to_all(rows, recv_splits, send_splits, self.group)
        # Received rows are source-major, local-expert-minor: regroup them by local expert.
        local_ids = torch.arange(local, device=rows.device).repeat(p)
        expert_idx = local_ids.repeat_interleave(recv_counts.reshape(-1))
        order = torch.argsort(expert_idx, stable=True)
        x_sorted = received.index_select(0, order)
        y_sorted = self.experts(x_sorted, recv_counts.sum(0), expert_idx[order])
        if x_sorted.requires_grad and not y_sorted.requires_grad:
            # No rows arrived: keep the (empty) output in the graph anyway, so that this rank
            # runs both backward exchanges that its peers run.
            y_sorted = y_sorted + x_sorted.sum() * 0
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = y_sorted.index_select(0, inverse)
        return all_to_all(y, send_splits, recv_splits, self.group)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
            f"local_experts=[{self.expert_offset}, {self.expert_offset + self.num_local_experts})"
        )


def expert_slice(experts: Experts, start: int, count: int) -> Experts:
    """Experts ``[start, start + count)`` of ``experts`` as a new :class:`Experts` (weights
    ``[count, ...]`` copied, same dtype, device and ``requires_grad``; the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):  # building must not move the global RNG
        out = Experts(
            count,
            experts.d_model,
            experts.d_expert,
            experts.activation,
            experts.b1 is not None,
            experts.backend,
            glu=experts.glu,
            output_bias=experts.b2 is not None,
        )
    for name, p in experts.named_parameters(recurse=False):
        shard = p.detach()[start : start + count].clone()
        setattr(out, name, nn.Parameter(shard, requires_grad=p.requires_grad))
    return out.to(experts.w1.device)


def _as_argument(capacity_factor: float | None) -> float | str:
    """A layer's resolved capacity factor as the MoE argument that gives it back."""
    return "dropless" if capacity_factor is None else capacity_factor


# --------------------------------------------------------------------------------------------
# Router statistics over the global batch
# --------------------------------------------------------------------------------------------


def global_load_balance_loss(probs: Tensor, assigned: Tensor, group: ProcessGroup | None) -> Tensor:
    """Switch / XMoE load-balance loss ``E * sum_e f_e * P_e`` over the tokens of all ranks of
    ``group``: :func:`~xmoe.routing.losses.load_balance_loss` with its statistics all-reduced
    (one all-reduce of ``2E + 2`` floats forward and one backward)."""
    return load_balance_loss(probs, assigned, partial(all_reduce_sum, group=group))


def use_global_router_stats(router: nn.Module, group: ProcessGroup | None = None) -> int:
    """Make the batch statistics of every router in ``router`` global over ``group`` (default:
    the world): sets each one's :attr:`~xmoe.routing.Router.reduce_stats` to the differentiable
    all-reduce over ``group``. Returns how many routers it set. Idempotent.

    What becomes global (training only):

    - ``load_balance`` (Switch / GShard / XMoE / DTS, every :class:`~xmoe.routing.LinearRouter`
      that reports it): f and P over the global batch (:func:`global_load_balance_loss`). In eval
      it stays per rank (no collective, so ranks may evaluate alone).
    - loss-free balancing (``selection_bias``): updated from the global expert load, so the
      buffer stays identical on every rank.

    Everything else a router computes stays per rank: token-mean losses (z-loss, entropy,
    soft count) average to the global value over equal shards; noisy top-k's importance / load
    CV², Expert Choice's and BASE's selection are computed within each rank's tokens.
    """
    reduce = partial(all_reduce_sum, group=group)
    routers = [m for m in router.modules() if isinstance(m, Router)]
    for module in routers:
        module.reduce_stats = reduce
    return len(routers)
