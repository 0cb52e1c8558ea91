"""RunDir: the run folder's layout, the resume / overwrite rules, metrics, summary, load_run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from xmoe.train import RunDir, load_config, load_run, train
from xmoe.train.checkpoint import save_checkpoint


def _files(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_layout_paths():
    run = RunDir("runs/x")
    assert run.config_path.as_posix() == "runs/x/config.yaml"
    assert run.metrics_path.name == "metrics.jsonl" and run.summary_path.name == "summary.json"
    assert run.data_dir.as_posix() == "runs/x/data"


def test_prepare_refuses_a_used_folder_unless_resumed_or_overwritten(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)  # created
    assert run.path.is_dir()
    run.save_config(load_config())
    (run.data_dir).mkdir()
    (run.data_dir / "tokens.bin").write_text("cache")
    run.append_metrics({"split": "train", "step": 1})
    run.write_summary({"steps": 1})
    with pytest.raises(ValueError, match="is not empty; pass --resume"):
        run.prepare(resume=False, overwrite=False)
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        run.prepare(resume=True, overwrite=False)
    with pytest.raises(ValueError, match="mutually exclusive"):
        run.prepare(resume=True, overwrite=True)
    run.prepare(resume=False, overwrite=True)
    # the whole run goes, the token cache too (a new --data must not meet the old tokens)
    assert _files(run.path) == {".xmoe-run", ".lock"}


def test_checkpoint_step_and_resume_need_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint() is None and run.checkpoint_step() == 0
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run.path, model, opt, {"step": 5})
    assert run.checkpoint() == tmp_path / "checkpoint" and run.checkpoint_step() == 5
    run.prepare(resume=True, overwrite=False)  # accepted


def test_config_round_trip_and_missing_config(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="has no config.yaml"):
        run.load_config()
    run.prepare(resume=False, overwrite=False)
    cfg = load_config(None, TINY)
    run.save_config(cfg)
    assert run.load_config() == cfg
    assert run.load_config({"train.steps": 3}).train.steps == 3


def test_metrics_append_read_and_truncate(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    run.truncate_metrics(3)  # nothing to truncate
    for step in (1, 2, 3, 4):
        run.append_metrics({"split": "train", "step": step, "loss": 1.0 / step})
    run.append_metrics({"split": "val", "step": 4, "final": True})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 4]
    run.truncate_metrics(2)
    assert run.read_metrics() == [
        {"split": "train", "step": 1, "loss": 1.0},
        {"split": "train", "step": 2, "loss": 0.5},
    ]
    assert _files(tmp_path) == {"metrics.jsonl"}  # written atomically, no temporary left


def test_summary_is_written_whole(tmp_path):
    run = RunDir(tmp_path)
    run.write_summary({"val_ppl": 3.5, "steps": 2})
    assert run.read_summary() == {"val_ppl": 3.5, "steps": 2}
    assert json.loads(run.summary_path.read_text())["steps"] == 2
    assert _files(tmp_path) == {"summary.json"}


def test_load_run_returns_the_trained_model_in_eval_mode(tmp_path, corpus):
    overrides = [*TINY, f"data.path={corpus}", "train.steps=2", "train.eval_every=100"]
    run = RunDir(tmp_path / "run")
    summary = train(load_config(None, overrides), run, progress=False)
    loaded = load_run(run.path)
    assert not loaded.model.training
    assert loaded.cfg == run.load_config()
    result = loaded.evaluate()
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    # overrides reach the model: another threshold changes the routing
    sparse = load_run(run, {"model.moe.router_options.threshold": 0.1}).evaluate()
    assert max(sparse["val_experts_per_token"]) <= max(result["val_experts_per_token"])
    empty = RunDir(tmp_path / "empty")
    empty.prepare(resume=False, overwrite=False)
    empty.save_config(load_config())
    with pytest.raises(ValueError, match="has no checkpoint"):
        load_run(empty)


def test_a_metrics_line_cut_short_by_a_crash_is_skipped_and_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"split": "train", "step": 1})
    with run.metrics_path.open("a") as f:
        f.write('{"split": "train", "st')  # killed mid-line
    assert run.read_metrics() == [{"split": "train", "step": 1}]
    run.truncate_metrics(1)
    run.append_metrics({"split": "train", "step": 2})
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
