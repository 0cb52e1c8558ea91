"""The run folder: its layout, its one writer, and loading a trained run back (``xmoe eval`` /
``generate``).

::

    <run>/.xmoe-run       marker: this folder is an xmoe run (``--overwrite`` refuses others)
    <run>/.lock           the writer's lock (xmoe.train.run_lock); holds its PID
    <run>/config.yaml     the RunConfig the run trains with (written before the first step)
    <run>/metrics.jsonl   one JSON object per train log line / eval
    <run>/summary.json    written at the end
    <run>/checkpoint/     the latest checkpoint, checkpoint.prev/ the one before (train.checkpoint)
    <run>/data/           tokenizer and token cache
    <run>/tensorboard/    TensorBoard event files (train.tensorboard)

A writer (:meth:`RunDir.writer`) holds the lock for the run's lifetime. Until it commits
(the run's checks passed and its first step is about to run) a failure undoes everything it did:
a new folder is removed again, and the run an ``--overwrite`` replaced is put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_write
from ..data.dataset import TokenData
from ..models.gpt import GPT
from .checkpoint import Snapshot, load_weights, resolve_checkpoint
from .config import Overrides, RunConfig, load_config
from .evaluate import evaluate
from .lm_task import build_model, load_data
from .run_lock import LOCK_NAME, RunLock

MARKER = ".xmoe-run"
TRASH_PREFIX = ".overwritten."  # an --overwrite's old run, until the new one has started


class RunDir:
    """One run's folder. Nothing is created until :meth:`writer` (or :meth:`prepare`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def is_xmoe_run(self) -> bool:
        """The folder holds an xmoe run: its marker, or (older runs) a ``config.yaml``."""
        return (self.path / MARKER).is_file() or self.config_path.is_file()

    def entries(self) -> list[Path]:
        """The folder's entries, but for the writer's lock file."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name != LOCK_NAME)

    def snapshot(self, warn: bool = True) -> Snapshot | None:
        """The newest checkpoint that passes its check (an older one, with a warning, when the
        newest fails), or None when the run has none."""
        return resolve_checkpoint(self.path, warn=warn) if self.path.is_dir() else None

    def checkpoint(self) -> Path | None:
        """The run's newest checkpoint folder that passes its check, or None."""
        snapshot = self.snapshot(warn=False)
        return None if snapshot is None else snapshot.path

    def checkpoint_step(self) -> int:
        """The step of the run's checkpoint (0 when there is none)."""
        snapshot = self.snapshot(warn=False)
        return snapshot.step if snapshot else 0

    def writer(self, *, resume: bool, overwrite: bool) -> RunWriter:
        """Lock the folder for writing and make it ready to train in (:class:`RunWriter`)."""
        return RunWriter(self, resume=resume, overwrite=overwrite).start()

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Check and make the folder ready to train in, as :meth:`writer` does, and commit at
        once (the lock is let go again)."""
        w = self.writer(resume=resume, overwrite=overwrite)
        w.commit()
        w.close()

    def save_config(self, cfg: RunConfig) -> None:
        cfg.save(self.config_path)

    def load_config(self, *overrides: Overrides) -> RunConfig:
        """The saved config (defaults fill keys an older run lacks) ← ``overrides``."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run dir {str(self.path)!r} is a file, not a run folder")
        if not self.config_path.exists():
            raise ValueError(f"run dir {str(self.path)!r} has no config.yaml (not an xmoe run?)")
        return load_config(self.config_path, *overrides)

    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """The metric records; a line a crash cut short is skipped."""
        if not self.metrics_path.exists():
            return []
        return [r for ln in self.metrics_path.read_text().splitlines() if (r := _record(ln))]

    def truncate_metrics(self, step: int) -> None:
        """Keep the metric lines of steps up to ``step`` but for the final evaluation (a resumed
        run logs what follows again, and its own final evaluation); drop cut-short lines."""
        if not self.metrics_path.exists():
            return
        kept = [
            ln
            for ln in self.metrics_path.read_text().splitlines()
            if (r := _record(ln)) and r.get("step", 0) <= step and not r.get("final")
        ]
        atomic_write(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2))

    def read_summary(self) -> dict:
        return json.loads(self.summary_path.read_text())


class RunWriter:
    """The one writer of a run folder, from :meth:`start` to :meth:`close`.

    ``start`` takes the lock and checks the folder: ``resume`` needs a checkpoint; otherwise the
    folder must be empty, or ``overwrite`` an xmoe run, whose entries (all of them: checkpoints,
    metrics, ``data/``...) are moved aside. :meth:`commit` (the run's checks passed) deletes
    them; :meth:`abort` (a start-up failure) undoes ``start``.
    """

    def __init__(self, run: RunDir, *, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite are mutually exclusive")
        self.run, self.resume, self.overwrite = run, resume, overwrite
        self.lock = RunLock(run.path)
        self.created_dir = False
        self.trash: Path | None = None
        self.started = False  # start() went through: what is in the folder now is this run's
        self.committed = False

    def start(self) -> RunWriter:
        run = self.run
        self.created_dir = not run.path.exists()
        self.lock.acquire()
        try:
            self._check_and_clear()
        except BaseException:
            self.abort()
            self.close()
            raise
        self.started = True
        return self

    def _check_and_clear(self) -> None:
        run = self.run
        leftovers = [p for p in run.entries() if p.name.startswith(TRASH_PREFIX)]
        if self.resume:
            if run.snapshot(warn=False) is None:
                raise ValueError(f"--resume: no checkpoint in run dir {str(run.path)!r}")
            return
        entries = [p for p in run.entries() if p not in leftovers]
        if entries:
            if not self.overwrite:
                raise ValueError(
                    f"run dir {str(run.path)!r} is not empty; pass --resume to continue it or "
                    "--overwrite to start over"
                )
            if not run.is_xmoe_run():
                raise ValueError(
                    f"run dir {str(run.path)!r} is not empty and is not an xmoe run (no {MARKER} "
                    "or config.yaml): --overwrite only replaces xmoe runs; choose another "
                    "--run-dir"
                )
            for p in leftovers:  # an earlier --overwrite that was killed before it started
                _remove(p)
            self.trash = run.path / f"{TRASH_PREFIX}{os.getpid()}"
            self.trash.mkdir()
            for p in entries:
                p.rename(self.trash / p.name)
        atomic_write(run.path / MARKER, json.dumps({"xmoe_run": 1}) + "\n")

    def commit(self) -> None:
        """The run has started: what ``--overwrite`` moved aside is deleted."""
        if self.trash is not None:
            shutil.rmtree(self.trash, ignore_errors=True)
            self.trash = None
        for p in self.run.entries():  # leftovers of killed --overwrites
            if p.name.startswith(TRASH_PREFIX):
                _remove(p)
        self.committed = True

    def abort(self) -> None:
        """Undo :meth:`start` after a start-up failure: a folder this writer created is removed,
        a fresh run's files are removed, the run ``--overwrite`` moved aside is put back."""
        if self.committed or not self.lock.held:
            return
        run = self.run
        if self.started and not self.resume:
            for p in run.entries():
                if p != self.trash:
                    _remove(p)
        if self.trash is not None:  # put the replaced run back
            for p in sorted(self.trash.iterdir()):
                p.rename(run.path / p.name)
            self.trash.rmdir()
            self.trash = None
        if not run.entries() or not self.started and self.lock.created_file:
            self.lock.release(remove=True)  # no lock file is left in a folder it refused
            if self.created_dir:
                with contextlib.suppress(OSError):
                    run.path.rmdir()

    def close(self) -> None:
        self.lock.release()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _record(line: str) -> dict | None:
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) else None


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: GPT  # in eval mode, with the checkpoint's weights
    data: TokenData

    def evaluate(self, batch_size: int | None = None, max_tokens: int | None = None) -> dict:
        """Validation metrics (``xmoe eval``); ``batch_size`` defaults to the run's."""
        size = batch_size or self.cfg.train.eval_batch_size
        return evaluate(self.model, self.data, size, max_tokens)


def load_run(path: str | Path | RunDir, *overrides: Overrides) -> LoadedRun:
    """A trained run's config (``overrides`` applied, e.g. another router threshold), its
    model at the checkpoint and its data."""
    run = path if isinstance(path, RunDir) else RunDir(path)
    cfg = run.load_config(*overrides)
    snapshot = run.snapshot()  # verified; an older one with a warning when the newest fails
    if snapshot is None:
        raise ValueError(f"run dir {str(run.path)!r} has no checkpoint")
    model = build_model(cfg, snapshot.step)
    load_weights(snapshot, model)
    model.eval()
    return LoadedRun(cfg, model, _read_data(cfg, run))


def _read_data(cfg: RunConfig, run: RunDir) -> TokenData:
    """The run's token data; a reader writes nothing into the run: without a complete cache
    (a run dir copied without ``data/``) the corpus is tokenized in a temporary folder."""
    if all((run.data_dir / name).is_file() for name in ("tokenizer.json", "tokens.npz")):
        return load_data(cfg, run.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        return load_data(cfg, Path(tmp))
