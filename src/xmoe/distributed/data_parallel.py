"""Gradient reduction and clipping for the data-parallel x expert-parallel layout.

Every rank computes the mean loss of its own shard of the global batch (equal shards), so the
single-process gradient of the global mean is ``(1/W) * sum over ranks``:

- replicated (non-expert) parameters: all-reduce (sum) over the world, divide by W;
- expert parameters of an expert-parallel layer: their local gradient already sums the
  contributions of the tokens of every rank of the EP group (the reverse all-to-all brought
  them); all-reduce (sum) over the expert-DP group (ranks holding the same slice; skipped when
  that is one rank), divide by W.

Gradients are reduced manually after ``backward`` (one flat all-reduce per group and dtype),
not with DDP: the expert parameters need a different group, and the step stays explicit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .groups import ParallelContext
from .model import expert_parameters


def reduce_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """Average gradients over the global batch in place (call after ``backward``, on every
    rank). A replicated parameter without a gradient on every rank keeps ``grad = None`` (the
    optimizer skips it, as in a single process); expert parameters always get one (zeros when
    no token reached this rank's slice: the single-process stacked weight would get a
    gradient)."""
    sharded = expert_parameters(model)
    replicated = [p for p in model.parameters() if p.requires_grad and p not in sharded]
    experts = [p for p in sharded if p.requires_grad]
    _sum_and_scale(replicated, ctx.world_group, ctx.world_size, keep_none=True)
    _sum_and_scale(experts, ctx.expert_dp_group, ctx.world_size, keep_none=False)


def _sum_and_scale(
    params: list[nn.Parameter], group: ProcessGroup | None, divisor: int, keep_none: bool
) -> None:
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group_params in by_dtype.items():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group_params]
        has_grad = torch.tensor(
            [p.grad is not None for p in group_params], dtype=dtype, device=grads[0].device
        )
        flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flags = flat[-len(group_params) :].tolist()
        offset = 0
        for p, flag in zip(group_params, flags, strict=True):
            n = p.numel()
            if keep_none and flag == 0:
                p.grad = None
            else:
                p.grad = (flat[offset : offset + n] / divisor).view_as(p).clone()
            offset += n


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: ParallelContext) -> Tensor:
    """Clip the global gradient norm (every parameter of the unsharded model counted once) to
    ``max_norm``, like ``torch.nn.utils.clip_grad_norm_``; returns the norm before clipping.

    Call after :func:`reduce_gradients` (replicated gradients are then identical on all ranks;
    the squared norms of the expert slices are summed over the EP group).
    """
    sharded = expert_parameters(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    replicated = [p.grad for p in model.parameters() if p.grad is not None and p not in sharded]
    experts = [p.grad for p in sharded if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    sq = lambda gs: sum(
        (g.detach().float().square().sum() for g in gs), torch.zeros((), device=device)
    )
    expert_sq = sq(experts)
    if ctx.expert_parallel > 1:
        dist.all_reduce(expert_sq, group=ctx.ep_group)
    total = (sq(replicated) + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def all_reduce_mean(values: list[float], ctx: ParallelContext) -> list[float]:
    """Mean over ranks of a list of host scalars (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ctx.world_group)
    return (t / ctx.world_size).tolist()
