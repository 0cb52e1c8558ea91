"""The training loop over the Task interface, and the step statistics of a world."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmoe import MoE
from xmoe.train import RunDir, load_config, train
from xmoe.train.step_stats import StepOutput, StepStats
from xmoe.train.world import LocalWorld


class ToyTask:
    """Linear regression: the loop trains it with no GPT, corpus or router in sight."""

    tokens_per_step = 8

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 1, generator=g)

    def build_model(self, step: int) -> nn.Module:
        return nn.Linear(4, 1)

    def setup(self, data_dir, model) -> None:
        self.prepared = True

    def reshape(self, model, step: int) -> str | None:
        return None

    def train_batch(self, step: int):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        return x, x @ self.w

    def loss(self, model, batch) -> StepOutput:
        x, y = batch
        mse = nn.functional.mse_loss(model(x), y)
        return StepOutput(mse, {"mse": mse.detach()})

    def routing_summary(self, model, experts_per_token, dropped_fraction) -> dict:
        return {}

    def evaluate(self, model, max_tokens) -> dict:
        with torch.no_grad():
            x, y = self.train_batch(10_000)
            return {"val_loss": nn.functional.mse_loss(model(x), y).item()}

    def describe(self, result: dict) -> str:
        return f"val mse {result['val_loss']:.3f}"

    def summary(self, model, state: dict, final: dict) -> dict:
        return {"steps": state["step"], **final}


def test_the_loop_trains_any_task(tmp_path):
    cfg = load_config(
        None,
        {"train.steps": 30, "train.lr": 0.2, "train.warmup_steps": 0, "train.log_every": 1},
        {"train.eval_every": 10, "train.checkpoint_every": 0},
    )
    task = ToyTask()
    run = RunDir(tmp_path / "toy")
    summary = train(cfg, run, progress=False, task=task)
    assert task.prepared and summary == run.read_summary()
    train_lines = [r for r in run.read_metrics() if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(1, 31))
    assert train_lines[-1]["mse"] < train_lines[0]["mse"] / 10
    assert train_lines[0]["loss"] == train_lines[0]["mse"]  # no router losses
    assert summary["steps"] == 30 and summary["val_loss"] < train_lines[0]["mse"]
    assert run.checkpoint_step() == 30


def test_step_stats_of_a_single_process_are_the_routings_own_figures():
    moe = MoE(16, 4, 8, router="topk", k=2)
    _, routing = moe.forward_with_routing(torch.randn(10, 16))
    out = StepOutput(torch.tensor(2.5), {"lm_loss": torch.tensor(2.0)}, [routing, routing])
    stats = StepStats.gather(out, False, LocalWorld().mean)
    assert (stats.loss, stats.values, stats.over_time) == (2.5, {"lm_loss": 2.0}, False)
    assert stats.experts_per_token == [routing.experts_per_token] * 2 == [2.0, 2.0]
    assert stats.dropped_fraction == [routing.dropped_fraction] * 2
    assert stats.router_losses == {k: pytest.approx(v.item()) for k, v in routing.losses.items()}


def test_step_stats_over_ranks_combine_counts_not_ratios():
    """Two ranks with 6 and 2 tokens: experts/token is total pairs over total tokens."""
    moe = MoE(16, 4, 8, router="threshold", threshold=0.6, init_std=0.5)
    _, a = moe.forward_with_routing(torch.randn(6, 16))
    _, b = moe.forward_with_routing(torch.randn(2, 16))
    packed = []
    for out, late in (
        (StepOutput(torch.tensor(1.0), {}, [a]), False),
        (StepOutput(torch.tensor(3.0), {}, [b]), True),
    ):
        StepStats.gather(out, late, lambda values: packed.append(values) or values)

    def all_reduce_mean(values):  # what every rank gets back
        return [(x + y) / 2 for x, y in zip(*packed, strict=True)]

    stats = StepStats.gather(StepOutput(torch.tensor(1.0), {}, [a]), False, all_reduce_mean)
    assert stats.loss == 2.0 and stats.over_time  # any rank over time: every rank stops
    assert stats.experts_per_token == [pytest.approx((a.num_pairs + b.num_pairs) / 8)]


def test_evomoe_run_grows_its_experts_at_diversify_step_and_loads_back(tmp_path, corpus):
    from conftest import TINY
    from xmoe.train import load_run

    cfg = load_config(
        None,
        TINY,
        {
            "data.path": corpus,
            "train.steps": 4,
            "train.eval_every": 100,
            "model.moe.router": "dts",
            "model.moe.router_options": {"renormalize": True},
            "model.moe.evo": {"diversify_step": 2},
        },
    )
    summary = train(cfg, tmp_path / "evo", progress=False)
    ept = [r["experts_per_token"] for r in RunDir(tmp_path / "evo").read_metrics() if "lr" in r]
    assert ept[0] == [1.0, 1.0]  # phase 1: one expert per layer
    assert summary["num_experts"] == 4
    model = load_run(tmp_path / "evo").model
    assert [m.num_experts for m in model.moe_layers] == [4, 4]
