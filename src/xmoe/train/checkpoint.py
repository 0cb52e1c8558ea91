"""Checkpoints: safetensors weights + optimizer tensors + JSON state, checksummed, written
atomically and durably, with the previous good one kept.

Layout of ``<run>/checkpoint/``: ``model.safetensors``, ``optimizer.safetensors`` (optimizer
state tensors and the torch RNG state), ``state.json`` (step, counters, optimizer
hyperparameters) and ``manifest.json`` (the SHA-256 and size of each of those files).

A new checkpoint is written to ``checkpoint.tmp/``, every file and the folder are flushed to
the disk (``fsync``), then renames swap it in: ``checkpoint/`` becomes ``checkpoint.prev/`` and
``checkpoint.tmp/`` becomes ``checkpoint/``. A crash or power loss at any point leaves at least
one complete checkpoint behind a good name. :func:`resolve_checkpoint` verifies every file
against the manifest and falls back, with a warning, to the previous checkpoint when the newest
one fails its check; :func:`read_checkpoint` reads one consistent snapshot even while a writer
swaps checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file, save_model
from torch import nn

from .._io import fsync_dir, fsync_file, sha256_bytes, sha256_file

if TYPE_CHECKING:
    from ..distributed.groups import ParallelContext

CKPT = "checkpoint"
PREV = f"{CKPT}.prev"  # the previous good checkpoint
TMP = f"{CKPT}.tmp"  # being written
LEGACY_OLD = f"{CKPT}.old"  # mid-swap name of the checkpoints of older xmoe versions
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing a file, or a file fails its check (named in the message)."""


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    parallel: ParallelContext | None = None,
) -> Path | None:
    """Atomically write model, optimizer and ``state`` (JSON-able) under ``run_dir/checkpoint``;
    the checkpoint it replaces becomes ``checkpoint.prev``.

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
    run_dir = Path(run_dir)
    final, tmp, prev = run_dir / CKPT, run_dir / TMP, run_dir / PREV
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
    files = {}
    for name in FILES:
        fsync_file(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {"format": FORMAT, "step": state.get("step"), "files": files}
    with open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)  # the previous good checkpoint stays until the next save
    tmp.rename(final)
    fsync_dir(run_dir)
    return final


@dataclass
class Snapshot:
    """One checkpoint's files, read and verified together."""

    path: Path
    state: dict  # state.json (with its "optimizer" entry)
    model: bytes  # model.safetensors
    optimizer: bytes  # optimizer.safetensors

    @property
    def step(self) -> int:
        return self.state["step"]

    def model_tensors(self) -> dict[str, torch.Tensor]:
        return _tensors(self.model, self.path / "model.safetensors")

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        return _tensors(self.optimizer, self.path / "optimizer.safetensors")


def candidates(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, newest name first (those that exist)."""
    return [p for name in (CKPT, PREV, LEGACY_OLD) if (p := Path(run_dir) / name).is_dir()]


def read_checkpoint(ckpt: Path, retries: int = 3) -> Snapshot:
    """The files of checkpoint folder ``ckpt``, verified against its manifest.

    Every file is opened relative to one handle on the folder, so a writer renaming it
    meanwhile cannot mix two checkpoints; a folder removed while it was read is read again
    (``retries`` times). A folder without a manifest (written by an older xmoe) is read
    unverified. Raises :class:`CheckpointError` naming the file that fails.
    """
    for attempt in range(retries + 1):
        try:
            return _read_verified(Path(ckpt))
        except FileNotFoundError as exc:
            if attempt == retries:
                raise CheckpointError(
                    f"checkpoint file {exc.filename or ckpt} is missing"
                ) from None
    raise AssertionError("unreachable")


def resolve_checkpoint(run_dir: Path, *, warn: bool = True) -> Snapshot | None:
    """The newest checkpoint of ``run_dir`` that passes its check, or None when there is none.

    When a newer one fails its check, the next one is used, with a warning naming what failed.
    When every checkpoint fails, :class:`CheckpointError` lists them.
    """
    failures = []
    for ckpt in candidates(run_dir):
        if not any((ckpt / name).exists() for name in (MANIFEST, "state.json")):
            continue  # an empty or foreign folder
        try:
            snapshot = read_checkpoint(ckpt)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures and warn:
            warnings.warn(
                f"{'; '.join(failures)}; falling back to {snapshot.path} (step {snapshot.step})",
                stacklevel=2,
            )
        return snapshot
    if failures:
        raise CheckpointError(f"no usable checkpoint in {str(run_dir)!r}: {'; '.join(failures)}")
    return None


def set_aside_corrupt(run_dir: Path) -> None:
    """Rename a ``checkpoint/`` that failed its check to ``checkpoint.corrupt/`` (kept for a
    look, replacing an older one), so that the next save does not push the good previous
    checkpoint out for it."""
    bad, aside = Path(run_dir) / CKPT, Path(run_dir) / f"{CKPT}.corrupt"
    if bad.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
        bad.rename(aside)
        fsync_dir(run_dir)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of a run that passes its check, or None."""
    snapshot = resolve_checkpoint(run_dir, warn=False)
    return None if snapshot is None else snapshot.path


def load_weights(ckpt: Path | Snapshot, model: nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` (shapes and names must match)."""
    snapshot = ckpt if isinstance(ckpt, Snapshot) else read_checkpoint(ckpt)
    tensors = snapshot.model_tensors()
    own = model.state_dict()
    # save_model writes a tied tensor once: a name is covered when one sharing its storage is
    stored = {own[k].data_ptr() for k in tensors if k in own}
    missing = sorted(k for k in set(own) - set(tensors) if own[k].data_ptr() not in stored)
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {str(snapshot.path)!r} does not match the model config: "
            f"missing={missing[:5]}, unexpected={unexpected[:5]}, shapes={shapes[:5]}"
        )
    model.load_state_dict(tensors, strict=False)  # tied weights appear once in the file


def load_checkpoint(
    ckpt: Path | Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore model, optimizer and RNG; return the saved state dict."""
    snapshot = ckpt if isinstance(ckpt, Snapshot) else read_checkpoint(ckpt)
    load_weights(snapshot, model)
    return load_training_state(snapshot, model, optimizer)


def load_training_state(
    ckpt: Path | Snapshot,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: ParallelContext | None = None,
) -> dict:
    """Restore optimizer and RNG (not the weights: :func:`load_weights`); return the state.

    With an expert-parallel ``model`` (``parallel.expert_parallel > 1``) the consolidated
    optimizer state of the expert parameters is sliced to this rank's experts.
    """
    snapshot = ckpt if isinstance(ckpt, Snapshot) else read_checkpoint(ckpt)
    state = json.loads(json.dumps(snapshot.state))  # a copy
    tensors = snapshot.optimizer_tensors()
    if "rng.torch" not in tensors or "optimizer" not in state:
        raise CheckpointError(f"checkpoint {str(snapshot.path)!r} has no optimizer / RNG state")
    rng = tensors.pop("rng.torch")
    if parallel is not None and parallel.expert_parallel > 1:
        from ..distributed.checkpoint import shard_optimizer_tensors

        tensors = shard_optimizer_tensors(tensors, model, optimizer)
    try:
        _restore_optimizer(optimizer, tensors, state.pop("optimizer"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(snapshot.path)!r}: the optimizer state does not match the model "
            f"({exc})"
        ) from None
    torch.set_rng_state(rng)
    return state


def _read_verified(ckpt: Path) -> Snapshot:
    fd = os.open(ckpt, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        raw = {}
        manifest = None
        with contextlib.suppress(FileNotFoundError):  # older xmoe: no checksums to verify
            raw[MANIFEST] = _read_at(fd, MANIFEST)
        for name in FILES:
            raw[name] = _read_at(fd, name)
    finally:
        os.close(fd)
    if MANIFEST in raw:
        manifest = _json(raw[MANIFEST], ckpt / MANIFEST)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or set(files) != set(FILES):
            raise CheckpointError(f"checkpoint manifest {ckpt / MANIFEST} is malformed")
        for name in FILES:
            entry = files[name]
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            if len(raw[name]) != entry.get("bytes") or sha256_bytes(raw[name]) != expected:
                raise CheckpointError(
                    f"checkpoint file {ckpt / name} fails its SHA-256 check "
                    f"({len(raw[name])} bytes; the manifest records {entry.get('bytes')}): it is "
                    "truncated or corrupted"
                )
    state = _json(raw["state.json"], ckpt / "state.json")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint file {ckpt / 'state.json'} has no valid step")
    snapshot = Snapshot(ckpt, state, raw["model.safetensors"], raw["optimizer.safetensors"])
    if manifest is None:  # unverified: at least the tensor files must parse
        snapshot.model_tensors()
        snapshot.optimizer_tensors()
    return snapshot


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _json(data: bytes, path: Path):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {exc}") from None


def _tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} is not a valid safetensors file: {exc}"
        ) from None


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
