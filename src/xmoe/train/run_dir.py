"""The run folder: its layout, and loading a trained run back (``xmoe eval`` / ``generate``).

::

    <run>/config.yaml     the RunConfig the run trains with (written before the first step)
    <run>/metrics.jsonl   one JSON object per train log line / eval
    <run>/summary.json    written at the end
    <run>/checkpoint/     the latest checkpoint (xmoe.train.checkpoint)
    <run>/data/           tokenizer and token cache
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_write
from ..data.dataset import TokenData
from ..models.gpt import GPT
from .checkpoint import CKPT, find_checkpoint, load_weights
from .config import Overrides, RunConfig, load_config
from .evaluate import evaluate
from .lm_task import build_model, load_data


class RunDir:
    """One run's folder. Nothing is created until :meth:`prepare`."""

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

    def checkpoint(self) -> Path | None:
        """The run's complete checkpoint folder, or None."""
        return find_checkpoint(self.path)

    def checkpoint_step(self) -> int:
        """The step of the run's checkpoint (0 when there is none)."""
        ckpt = self.checkpoint()
        return json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder ready to train in.

        ``resume``: it must hold a checkpoint. Otherwise it must be empty, or ``overwrite``
        clears the run's files (``data/``, the tokenizer and token cache, is kept).
        """
        if resume and overwrite:
            raise ValueError("--resume and --overwrite are mutually exclusive")
        if resume:
            if self.checkpoint() is None:
                raise ValueError(f"--resume: no checkpoint in run dir {str(self.path)!r}")
            return
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"run dir {str(self.path)!r} is not empty; pass --resume to continue it or "
                    "--overwrite to start over"
                )
            for name in (CKPT, f"{CKPT}.old", f"{CKPT}.tmp"):
                shutil.rmtree(self.path / name, ignore_errors=True)
            for p in (self.metrics_path, self.summary_path, self.config_path):
                p.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def save_config(self, cfg: RunConfig) -> None:
        cfg.save(self.config_path)

    def load_config(self, *overrides: Overrides) -> RunConfig:
        """The saved config (defaults fill keys an older run lacks) ← ``overrides``."""
        if not self.config_path.exists():
            raise ValueError(f"run dir {str(self.path)!r} has no config.yaml (not an xmoe run?)")
        return load_config(self.config_path, *overrides)

    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after ``step`` (a resumed run logs them again)."""
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        atomic_write(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2))

    def read_summary(self) -> dict:
        return json.loads(self.summary_path.read_text())


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
    ckpt = run.checkpoint()
    if ckpt is None:
        raise ValueError(f"run dir {str(run.path)!r} has no checkpoint")
    model = build_model(cfg, run.checkpoint_step())
    load_weights(ckpt, model)
    model.eval()
    return LoadedRun(cfg, model, load_data(cfg, run.data_dir))
