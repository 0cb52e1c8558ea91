"""What the training loop trains: a small task interface.

The loop (:mod:`xmoe.train.loop`) owns the optimizer, the schedule, the world, the log and the
checkpoints; a :class:`Task` owns the model, the data and what a loss or an evaluation is.
:class:`~xmoe.train.lm_task.LMTask` (the GPT language model) is the first one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from .step_stats import StepOutput


class Task(Protocol):
    """Optional methods the loop calls when a task has them (``getattr`` with no default
    needed by other tasks):

    - ``check_data() -> None``: after :meth:`setup`, before the run's first step; raise
      ``ValueError`` when the data cannot train or evaluate (a split too small for one block),
      so a run fails before it writes anything.
    """

    tokens_per_step: int  # tokens of one global batch (throughput, tokens_seen)

    def build_model(self, step: int) -> nn.Module:
        """The model in the shape the run has at ``step`` (0: fresh; a resumed run's step)."""

    def setup(self, data_dir: Path, model: nn.Module) -> None:
        """Load (or, the first time, prepare) the data under ``data_dir``; fit what the model
        takes from the data. Runs on rank 0 first, then on the other ranks."""

    def reshape(self, model: nn.Module, step: int) -> str | None:
        """Change the model's structure at the start of ``step``, if the recipe says so; returns
        a message when it did (the loop then re-lays the model and rebuilds the optimizer)."""

    def train_batch(self, step: int) -> tuple[Tensor, ...]:
        """The global batch of ``step`` (a pure function of the step): tensors, rows on dim 0."""

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> StepOutput:
        """Forward ``batch``: the loss to backpropagate, values to log, the routings."""

    def routing_summary(
        self, model: nn.Module, experts_per_token: list[float], dropped_fraction: list[float]
    ) -> dict:
        """Per-layer routing figures of a step to log (experts/token, compute ratio ...)."""

    def evaluate(self, model: nn.Module, max_tokens: int | None) -> dict:
        """Validation metrics (``max_tokens=None``: the whole validation split)."""

    def describe(self, result: dict) -> str:
        """One line for an evaluation's result."""

    def summary(self, model: nn.Module, state: dict, final: dict) -> dict:
        """``summary.json`` from the loop's counters ``state`` and the final evaluation."""
