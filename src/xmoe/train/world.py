"""The processes a run trains on: one (:class:`LocalWorld`) or a torch.distributed layout
(:class:`DistributedWorld`). :func:`make_world` picks one, once, at setup; the training loop
calls the same methods on either, and a single process is a world of size 1 whose
collectives are the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from torch import Tensor, nn

from .checkpoint import load_training_state, save_checkpoint
from .config import RunConfig

if TYPE_CHECKING:
    from ..distributed import ParallelContext

T = TypeVar("T")


class World(Protocol):
    is_main: bool  # rank 0: logs, writes the run dir and the checkpoint
    evaluates: bool  # this rank runs the evaluations

    def shard(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """This rank's rows (dim 0) of every tensor of the global batch."""

    def parallelize(self, model: nn.Module) -> None:
        """Put ``model`` (built identically on every rank) in this world's layout, in place."""

    def reduce_gradients(self, model: nn.Module) -> None:
        """Gradients of the global batch's mean loss, after ``backward``."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the global gradient norm; returns the norm before clipping."""

    def mean(self, values: list[float]) -> list[float]:
        """Mean over ranks of host scalars."""

    def run_on_main(self, fn: Callable[[], None]) -> None:
        """``fn()`` on rank 0 only; its ``ValueError`` is raised on every rank."""

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then (once it succeeded) on the other ranks."""

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""

    def seed_rank(self, seed: int, step: int) -> None:
        """Give every rank but 0 its own dropout / noise stream."""

    def save_checkpoint(self, run_dir: Path, model, optimizer, state: dict) -> None: ...

    def load_training_state(self, ckpt: Path, model, optimizer) -> dict: ...

    def summary(self, model: nn.Module) -> dict:
        """Entries of ``summary.json`` that depend on the layout."""

    def close(self) -> None: ...


class LocalWorld:
    """One process: every collective is the identity."""

    is_main = True
    evaluates = True

    def shard(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return batch

    def parallelize(self, model: nn.Module) -> None:
        pass

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, values: list[float]) -> list[float]:
        return values

    def run_on_main(self, fn: Callable[[], None]) -> None:
        fn()

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    def broadcast(self, value: T) -> T:
        return value

    def seed_rank(self, seed: int, step: int) -> None:
        pass

    def save_checkpoint(self, run_dir: Path, model, optimizer, state: dict) -> None:
        save_checkpoint(run_dir, model, optimizer, state)

    def load_training_state(self, ckpt: Path, model, optimizer) -> dict:
        return load_training_state(ckpt, model, optimizer)

    def summary(self, model: nn.Module) -> dict:
        return {}

    def close(self) -> None:
        pass


class DistributedWorld:
    """This rank of a data x expert parallel layout (:class:`~xmoe.distributed.ParallelContext`).

    Each rank trains on its shard of every global batch; rank 0 logs and writes the
    (consolidated) checkpoint. ``owns_group``: :meth:`close` destroys the process group.
    """

    def __init__(self, ctx: ParallelContext, owns_group: bool = False) -> None:
        from .. import distributed

        self.ctx = ctx
        self.owns_group = owns_group
        self._d = distributed
        self.is_main = ctx.is_main
        # Evaluation runs where the model runs: with expert parallelism every rank takes part
        # in every forward, so all ranks evaluate the same (full) val batches.
        self.evaluates = ctx.is_main or ctx.expert_parallel > 1

    def shard(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        rows = batch[0].shape[0] // self.ctx.world_size
        lo, hi = self.ctx.rank * rows, (self.ctx.rank + 1) * rows
        return tuple(t[lo:hi] for t in batch)

    def parallelize(self, model: nn.Module) -> None:
        self._d.parallelize_model(model, self.ctx)

    def reduce_gradients(self, model: nn.Module) -> None:
        self._d.reduce_gradients(model, self.ctx)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return self._d.clip_grad_norm_(model, max_norm, self.ctx)

    def mean(self, values: list[float]) -> list[float]:
        return self._d.all_reduce_mean(values, self.ctx)

    def run_on_main(self, fn: Callable[[], None]) -> None:
        self._d.run_on_main(self.ctx, fn)

    def main_first(self, fn: Callable[[], T]) -> T:
        box: list[T] = []
        self._d.run_on_main(self.ctx, lambda: box.append(fn()))
        return box[0] if box else fn()

    def broadcast(self, value: T) -> T:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def seed_rank(self, seed: int, step: int) -> None:
        if not self.is_main:
            torch.manual_seed(seed * 1_000_003 + self.ctx.rank * 7919 + step)

    def save_checkpoint(self, run_dir: Path, model, optimizer, state: dict) -> None:
        save_checkpoint(run_dir, model, optimizer, state, self.ctx)

    def load_training_state(self, ckpt: Path, model, optimizer) -> dict:
        return load_training_state(ckpt, model, optimizer, self.ctx)

    def summary(self, model: nn.Module) -> dict:
        c = self.ctx
        return {
            "params": self._d.global_num_params(model, c),
            "parallel": {
                "world_size": c.world_size,
                "expert_parallel": c.expert_parallel,
                "data_parallel": c.data_parallel,
            },
        }

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def make_world(cfg: RunConfig, parallel: ParallelContext | None = None) -> World:
    """The world of this process: ``parallel`` when given, else the torchrun launch's (the
    process group is initialised here, and destroyed by ``close``), else a single process."""
    if parallel is not None:
        return DistributedWorld(parallel)
    import torch.distributed as dist

    from ..distributed import check_expert_parallel, init_parallel, launched_world_size

    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else launched_world_size()
    p = cfg.parallel.expert_parallel
    if world == 1 and p == 1:
        return LocalWorld()
    num_experts = cfg.model.moe.num_experts if cfg.model.moe_every else None
    check_expert_parallel(p, world, num_experts)
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
            f"{world} (every rank reads batch_size / world_size sequences of each batch)"
        )
    # gloo: the trainer keeps the model on the CPU (the EP layer itself is device-agnostic and
    # runs on NCCL with CUDA tensors when given such a group).
    return DistributedWorld(init_parallel(p, num_experts, backend="gloo"), not initialised)
