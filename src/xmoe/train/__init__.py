"""Training harness: loop, schedule, checkpoints, evaluation."""

from .checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from .evaluate import evaluate
from .schedule import lr_at
from .trainer import build_optimizer, load_data, train

__all__ = [
    "build_optimizer",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint",
    "load_data",
    "load_training_state",
    "load_weights",
    "lr_at",
    "save_checkpoint",
    "train",
]
