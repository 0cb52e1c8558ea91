"""The tasks ``xmoe train --task NAME`` can run: a registry of :class:`~xmoe.train.task.Task`
classes, imported lazily so that a task's heavy dependencies load only when it runs.

A task class is built as ``TaskClass(cfg)`` from the whole :class:`~xmoe.train.config.RunConfig`.
Its own settings live in the config's free-form ``task_options`` section; a task class that has
settings declares them as a dataclass in its ``Options`` attribute, and :func:`task_options`
parses and checks them (unknown keys are refused by their full path, ``task_options.bogus``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from .typed import from_dict

if TYPE_CHECKING:
    from .task import Task


class TaskSpec(Protocol):
    """What this module reads of a config: a :class:`~xmoe.train.config.RunConfig` fits (named
    structurally, so that config.py, which validates through here, is not imported back)."""

    task: str
    task_options: dict


# name -> "module:Class" (module relative to the xmoe package)
TASKS: dict[str, str] = {
    "lm": "xmoe.train.lm_task:LMTask",
    "exit": "xmoe.train.exit_task:ExitTask",
    "translate": "xmoe.train.translate_task:TranslateTask",
}


def task_class(name: str) -> type:
    """The class registered as ``name``; a ``ValueError`` naming the accepted tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    module, _, attr = TASKS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:  # a registered task whose module is missing
        raise ValueError(f"task {name!r} is not available: {exc}") from exc


def task_options(cfg: TaskSpec):
    """``cfg.task_options`` parsed as the task's ``Options`` dataclass (None if it has none)."""
    cls = task_class(cfg.task)
    options = getattr(cls, "Options", None)
    if options is None:
        if cfg.task_options:
            raise ValueError(
                f"task {cfg.task!r} takes no task_options, got {sorted(cfg.task_options)}"
            )
        return None
    parsed = from_dict(options, cfg.task_options or {}, prefix="task_options.")
    if hasattr(parsed, "validate"):
        parsed.validate()
    return parsed


def make_task(cfg: TaskSpec) -> Task:
    """The task ``cfg.task`` names, built on ``cfg``."""
    return task_class(cfg.task)(cfg)
