"""Issue 17 item 8: TensorBoard event files of a run (train.tensorboard: true)."""

from __future__ import annotations

import sys

import pytest

from conftest import TINY
from xmoe.train import RunDir, load_config, train
from xmoe.train.tensorboard import scalars

pytest.importorskip("tensorboard")


def _tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_event_files_hold_the_loss_lr_throughput_routing_and_router_losses(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    overrides = [*TINY, f"data.path={corpus}", "train.steps=4", "train.eval_every=2"]
    cfg = load_config(None, overrides, ["train.tensorboard=true"])
    train(cfg, run, progress=False)
    acc = _tags(run.tensorboard_dir)
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lm_loss",
        "train/ppl",
        "train/lr",
        "train/tokens_per_s",
        "train/grad_norm",
        "train/moe_compute_ratio",
        "router_losses/load_balance",
        "router_losses/z_loss",
        "val/loss",
        "val/ppl",
    }
    for kind in ("experts_per_token", "load_imbalance"):
        expected |= {f"{kind}/train/layer0", f"{kind}/train/layer1", f"{kind}/train/mean"}
        expected |= {f"{kind}/val/layer0", f"{kind}/val/layer1"}
    assert expected <= tags, expected - tags
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    records = [r for r in run.read_metrics() if r["split"] == "train"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in records], rel=1e-6
    )
    for r in records:  # the per-step load imbalance is also in metrics.jsonl
        assert all(1.0 <= v <= 4.0 for v in r["load_imbalance"])
    # a resumed run appends; purge_step hides the steps an earlier process logged after it
    train(run.load_config({"train.steps": 6}), run, resume=True, progress=False)
    steps = [e.step for e in _tags(run.tensorboard_dir).Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_without_the_package_asking_for_event_files_is_a_clear_error(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    cfg = load_config(
        None, [*TINY, f"data.path={corpus}", "train.steps=2", "train.tensorboard=true"]
    )
    with pytest.raises(ValueError, match="tensorboard package is not installed"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_scalars_skip_missing_and_non_finite_values():
    record = {
        "split": "train",
        "step": 3,
        "loss": 2.0,
        "lr": 0.1,
        "grad_norm": None,
        "experts_per_token": [1.5, float("nan")],
        "router_losses": {"z_loss": None, "load_balance": 1.25},
    }
    out = scalars(record)
    assert out["train/ppl"] == pytest.approx(7.389056, rel=1e-6)
    assert out["experts_per_token/train/layer0"] == 1.5
    assert "experts_per_token/train/layer1" not in out and "train/grad_norm" not in out
    assert "experts_per_token/train/mean" not in out and "router_losses/z_loss" not in out
    assert out["router_losses/load_balance"] == 1.25
