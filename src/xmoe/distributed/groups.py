"""Process groups for expert parallelism (EP) x data parallelism (DP).

World of ``W`` ranks, EP size ``P`` (``W % P == 0``), ``D = W / P`` replicas of every expert.

- **EP group** (size P): ranks ``[g*P, (g+1)*P)``. Together they hold one copy of all ``E``
  experts, rank ``i`` of the group the contiguous slice ``[i*E/P, (i+1)*E/P)``. The token
  all-to-all runs inside this group.
- **expert-DP group** (size D): ranks ``{i, i+P, i+2P, ...}`` hold the same expert slice; expert
  gradients are summed inside it (nothing to do when D == 1).
- **world**: every non-expert parameter (attention, embeddings, norms, routers) is replicated on
  all ranks and its gradient is summed over the world. Every rank reads a different shard of the
  global batch, so the world is also the data-parallel group of the batch-level statistics.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .._checks import check_int


@dataclass
class ParallelContext:
    """This rank's place in the layout. Built by :func:`init_parallel` or :func:`make_context`.

    Attributes:
        rank, world_size: in the default (world) group.
        expert_parallel: P, ranks sharing one copy of the experts.
        ep_group: the P ranks of this rank's EP group (the all-to-all group).
        ep_rank: this rank's index in it (which expert slice it holds).
        expert_dp_group: the ``world_size / P`` ranks that hold this rank's expert slice, or
            None when that is this rank alone.
        world_group: the default group (gradient reduction of non-expert parameters, global
            router statistics).
    """

    rank: int
    world_size: int
    expert_parallel: int
    ep_group: ProcessGroup | None
    ep_rank: int
    expert_dp_group: ProcessGroup | None
    world_group: ProcessGroup | None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates to file and writes checkpoints."""
        return self.rank == 0

    @property
    def data_parallel(self) -> int:
        """D = W / P, replicas of each expert slice."""
        return self.world_size // self.expert_parallel

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """``[start, stop)`` of the global expert ids this rank holds."""
        per_rank = num_experts // self.expert_parallel
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def check_expert_parallel(expert_parallel: int, world_size: int, num_experts: int | None) -> None:
    """Clear errors for layouts that cannot work."""
    check_int("parallel.expert_parallel", expert_parallel, 1)
    if expert_parallel > world_size:
        hint = (
            f"; launch with `torchrun --nproc_per_node {expert_parallel} -m xmoe train ...`"
            if world_size == 1
            else ""
        )
        raise ValueError(
            f"parallel.expert_parallel={expert_parallel} is larger than the world size "
            f"{world_size}{hint}"
        )
    if world_size % expert_parallel:
        raise ValueError(
            f"parallel.expert_parallel={expert_parallel} must divide the world size {world_size}"
        )
    if num_experts is not None and num_experts % expert_parallel:
        raise ValueError(
            f"model.moe.num_experts={num_experts} is not divisible by "
            f"parallel.expert_parallel={expert_parallel}: each rank must hold the same number "
            "of experts"
        )


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(
    expert_parallel: int = 1, num_experts: int | None = None, backend: str | None = None
) -> ParallelContext:
    """Initialise the default process group from the torchrun environment (unless it already
    is) and build the EP / expert-DP groups. Every rank must call this, in the same order."""
    if not dist.is_initialized():
        world = launched_world_size()
        check_expert_parallel(expert_parallel, world, num_experts)
        dist.init_process_group(backend or default_backend())
    return make_context(expert_parallel, num_experts)


def make_context(expert_parallel: int, num_experts: int | None = None) -> ParallelContext:
    """Build the groups of :class:`ParallelContext` on an initialised default group.

    ``new_group`` is collective: all ranks create all groups, in the same order.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel(expert_parallel, world, num_experts)
    p = expert_parallel
    ep_group = expert_dp_group = None
    for g in range(world // p):
        ranks = list(range(g * p, (g + 1) * p))
        group = dist.group.WORLD if p == world else dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    if world > p:
        for i in range(p):
            ranks = list(range(i, world, p))
            group = dist.group.WORLD if p == 1 else dist.new_group(ranks)
            if rank in ranks:
                expert_dp_group = group
    return ParallelContext(
        rank=rank,
        world_size=world,
        expert_parallel=p,
        ep_group=ep_group,
        ep_rank=rank % p,
        expert_dp_group=expert_dp_group,
        world_group=dist.group.WORLD,
    )


def run_on_main(ctx: ParallelContext, fn) -> None:
    """Run ``fn()`` on rank 0 only; if it raises ``ValueError`` / ``FileNotFoundError`` every
    rank raises (the same message), so a bad run dir fails cleanly instead of hanging."""
    error: Exception | None = None
    if ctx.is_main:
        try:
            fn()
        except (ValueError, FileNotFoundError) as exc:
            error = exc
    message = [None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise ValueError(message[0])


def free_local_port() -> int:
    """A free TCP port on 127.0.0.1, for a local process group (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_gloo(rank: int, world_size: int, port: int, timeout_s: float = 300) -> None:
    """Join a gloo group on 127.0.0.1:``port`` with one intra-op thread per rank.

    The CPU-only multi-process setup of the tests and ``xmoe.bench.comm``; torchrun runs use
    ``init_parallel``.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
