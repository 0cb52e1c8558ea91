"""Training harness: config, run folder, one loop over a small task interface, checkpoints."""

from .checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from .config import RunConfig, load_config, with_overrides
from .evaluate import evaluate
from .lm_task import LMTask, build_model, load_data
from .loop import build_optimizer, train
from .run_dir import RunDir, load_run
from .schedule import lr_at
from .task import Task

__all__ = [
    "LMTask",
    "RunConfig",
    "RunDir",
    "Task",
    "build_model",
    "build_optimizer",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_data",
    "load_run",
    "load_training_state",
    "load_weights",
    "lr_at",
    "save_checkpoint",
    "train",
    "with_overrides",
]
