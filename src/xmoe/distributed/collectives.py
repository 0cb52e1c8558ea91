"""Differentiable collectives: the token exchange of expert parallelism and a summing all-reduce.

Both are ``torch.autograd.Function``s whose backward runs the matching collective, so every rank
must run the same sequence of forward *and* backward calls (the model is identical on all ranks,
so its autograd graph, and the order of its backward collectives, is too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _AllToAll(torch.autograd.Function):
    """Rows ``x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`` go to rank j; the result holds the
    rows from every rank, source-major (``out_splits[j]`` rows from rank j).

    Backward is the reverse exchange (splits swapped): the gradient of each received row goes
    back to the rank that sent it.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None
    ) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None
) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Exchange rows of ``x: [sum(in_splits), ...]`` → ``[sum(out_splits), ...]`` (autograd).

    ``in_splits[j]``: rows this rank sends to rank j of ``group``; ``out_splits[j]``: rows it
    receives from rank j. Zero-row splits (and a rank with no rows at all) are fine.
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def exchange_counts(counts: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """The small all-to-all of per-expert counts (no autograd).

    ``counts: [P * L]`` int64, rows this rank sends to each of the P ranks' L local experts →
    ``[P, L]``: row s = the rows rank s sends to each of this rank's L experts.
    """
    size = dist.get_world_size(group)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out.view(size, -1)


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks of x``; the gradient of each rank's input is the sum over ranks of the
    output gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group``."""
    return _AllReduceSum.apply(x, group)
