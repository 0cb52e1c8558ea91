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
from ..routing import Routing
from ..routing.base import LinearRouter
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
        nn.Module.__init__(self)
        if moe.num_experts % ep_size:
            raise ValueError(
                f"num_experts={moe.num_experts} is not divisible by the expert-parallel size "
                f"{ep_size}: each rank must hold the same number of experts"
            )
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")
        local = moe.num_experts // ep_size
        start = ep_rank * local
        src = moe.experts
        # Registration order (experts, then router) matches MoE, so parameters() — and thus
        # optimizer parameter ids and checkpoint names — line up with the single-process model.
        with torch.random.fork_rng(devices=[]):  # building must not move the global RNG
            self.experts = Experts(
                local, src.d_model, src.d_expert, src.activation, src.b1 is not None, src.backend
            )
        for name, p in src.named_parameters(recurse=False):
            shard = p.detach()[start : start + local].clone()
            setattr(self.experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        self.experts.to(src.w1.device)
        self.router = moe.router
        self.d_model = moe.d_model
        self.num_experts = moe.num_experts
        self.d_expert = moe.d_expert
        self.capacity_factor = moe.capacity_factor
        self.eval_capacity_factor = moe.eval_capacity_factor
        self.last_routing: Routing | None = None
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = local
        self.expert_offset = start

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


# --------------------------------------------------------------------------------------------
# Router statistics over the global batch
# --------------------------------------------------------------------------------------------


def global_load_balance_loss(probs: Tensor, assigned: Tensor, group: ProcessGroup | None) -> Tensor:
    """Switch / XMoE load-balance loss ``E * sum_e f_e * P_e`` over the tokens of all ranks.

    ``f_e`` (fraction of counted assignments on expert e) and ``P_e`` (mean router probability)
    are built from counts and probability sums all-reduced over ``group``: with equal-size
    shards the value and the (DP-averaged) gradient equal the single-process loss on the
    concatenated batch. One all-reduce of ``2E + 2`` floats forward and one backward.
    """
    num_experts = probs.shape[-1]
    counts = torch.bincount(assigned, minlength=num_experts).to(probs.dtype)
    sizes = probs.new_tensor([assigned.numel(), probs.shape[0]])
    stats = all_reduce_sum(torch.cat([probs.sum(0), counts, sizes]), group)
    prob_sum, counts = stats[:num_experts], stats[num_experts:-2].detach()
    m, n = stats[-2].detach().clamp_min(1), stats[-1].detach().clamp_min(1)  # 0 tokens → loss 0
    return num_experts * (counts / m * prob_sum / n).sum()


def _global_standard_losses(
    router: LinearRouter, group: ProcessGroup | None, logits: Tensor, probs: Tensor, routing
) -> dict[str, Tensor]:
    """The router's own ``standard_losses``, with ``load_balance`` recomputed globally in
    training (in eval it stays per rank: no collective, so ranks may evaluate alone)."""
    losses = type(router).standard_losses(router, logits, probs, routing)
    if "load_balance" in losses and router.training:
        probs = probs[:, : router.num_experts]
        top1 = router.balance_over == "top1"
        assigned = probs.argmax(dim=-1) if top1 else routing.expert_idx
        losses["load_balance"] = global_load_balance_loss(probs, assigned, group)
    return losses


@torch.no_grad()
def _global_update_bias(router, group: ProcessGroup | None, routing: Routing) -> None:
    """Loss-free balancing bias update from the global expert load (keeps ranks in sync)."""
    load = routing.expert_counts.float()
    dist.all_reduce(load, group=group)
    router.selection_bias += router.bias_update_rate * torch.sign(load.mean() - load)


def use_global_router_stats(router: nn.Module, group: ProcessGroup | None = None) -> int:
    """Make the batch-level statistics of every linear router in ``router`` global over
    ``group`` (default: the world); returns how many routers were changed. Idempotent.

    - ``load_balance`` (Switch / GShard / XMoE, every :class:`LinearRouter`): f and P over the
      global batch (:func:`global_load_balance_loss`), in training mode.
    - loss-free balancing (``selection_bias``): updated from the global expert load, so the
      buffer stays identical on every rank.

    Everything else a router computes stays per rank: token-mean losses (z-loss, entropy,
    soft count) average to the global value over equal shards; noisy top-k's importance / load
    CV², Expert Choice's and BASE's selection are computed within each rank's tokens.

    Each rank's router instance gets its own ``standard_losses`` (and ``_update_bias``)
    attribute, bound to ``group``; the class is untouched.
    """
    changed = 0
    for module in router.modules():
        if not isinstance(module, LinearRouter) or "standard_losses" in vars(module):
            continue
        module.standard_losses = partial(_global_standard_losses, module, group)
        if getattr(module, "loss_free_balance", False) and hasattr(module, "_update_bias"):
            module._update_bias = partial(_global_update_bias, module, group)
        changed += 1
    return changed
