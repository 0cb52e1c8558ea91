"""Checkpoints: safetensors weights + optimizer tensors + JSON state, written atomically.

Layout of ``<run>/checkpoint/``: ``model.safetensors``, ``optimizer.safetensors`` (optimizer
state tensors and the torch RNG state), ``state.json`` (step, counters, optimizer hyperparameters).
A new checkpoint is written to ``checkpoint.tmp/`` and swapped in by renames, so a crash at any
point leaves a complete checkpoint (``checkpoint/`` or, mid-swap, ``checkpoint.old/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

if TYPE_CHECKING:
    from ..distributed.groups import ParallelContext

CKPT = "checkpoint"


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    parallel: ParallelContext | None = None,
) -> Path | None:
    """Atomically write model, optimizer and ``state`` (JSON-able) under ``run_dir/checkpoint``.

    With ``parallel`` (a multi-process run) every rank must call it: expert-parallel tensors
    are gathered to the unsharded model, and rank 0 writes (the others return None). The
    checkpoint is the one a single process would write, so it loads at any world size.
    """
    if parallel is None:
        model_tensors, opt_sd = None, optimizer.state_dict()
    else:
        from ..distributed.checkpoint import consolidated_model_state, consolidated_optimizer_state

        model_tensors = consolidated_model_state(model)
        opt_sd = consolidated_optimizer_state(model, optimizer)
        if not parallel.is_main:
            return None
    final, tmp, old = run_dir / CKPT, run_dir / f"{CKPT}.tmp", run_dir / f"{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model_tensors is None:
        save_model(model, str(tmp / "model.safetensors"))
    else:
        save_file(model_tensors, str(tmp / "model.safetensors"))
    tensors, opt_meta = _flatten_optimizer(opt_sd)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint directory of a run, or None."""
    for name in (CKPT, f"{CKPT}.old"):
        p = run_dir / name
        if (p / "state.json").exists():
            return p
    return None


def load_weights(ckpt: Path, model: nn.Module) -> None:
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} does not match the model config: missing={missing}, "
            f"unexpected={unexpected}"
        )


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG; return the saved state dict."""
    load_weights(ckpt, model)
    return load_training_state(ckpt, model, optimizer)


def load_training_state(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: ParallelContext | None = None,
) -> dict:
    """Restore optimizer and RNG (not the weights: :func:`load_weights`); return the state.

    With an expert-parallel ``model`` (``parallel.expert_parallel > 1``) the consolidated
    optimizer state of the expert parameters is sliced to this rank's experts.
    """
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    if parallel is not None and parallel.expert_parallel > 1:
        from ..distributed.checkpoint import shard_optimizer_tensors

        tensors = shard_optimizer_tensors(tensors, model, optimizer)
    _restore_optimizer(optimizer, tensors, state.pop("optimizer"))
    return state


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
