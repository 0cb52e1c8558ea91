"""CLI smoke tests: tiny train → eval → generate → resume, exact resume, bad arguments."""

import json
import math
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import xmoe.train.loop as loop_mod
from conftest import TINY, sets
from xmoe.cli import main
from xmoe.train import train
from xmoe.train.config import load_config


def test_train_eval_generate_resume(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--data", corpus, "--no-progress"]
    assert main(args + sets("train.steps=4", "train.eval_every=2")) == 0
    summary = json.loads((run / "summary.json").read_text())
    # TINY: vocab 300, 4 experts of width 8 replacing a dense FFN of width 32, threshold 0.9
    assert 1 < summary["val_ppl"] < 2 * 300 and 1 < summary["unigram_ppl"] < 300
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert 1 <= summary["experts_per_token"] <= 4
    assert summary["moe_compute_ratio"] == pytest.approx(summary["experts_per_token"] * 8 / 32)
    assert summary["steps"] == 4
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" for r in lines)
    assert (run / "checkpoint" / "model.safetensors").exists()

    capsys.readouterr()
    assert main(["eval", str(run), "--max-tokens", "128"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_tokens"] == 128 and result["val_ppl"] > 1

    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")

    # A non-empty run dir without --resume/--overwrite is refused.
    assert main(args + sets("train.steps=4")) == 2
    assert "--resume" in capsys.readouterr().err

    assert (
        main(
            ["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.steps=6"]
        )
        == 0
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, corpus, monkeypatch):
    overrides = [
        *TINY,
        f"data.path={corpus}",
        "train.steps=6",
        "train.checkpoint_every=3",
        "train.eval_every=100",
        "model.moe.router=topk",
        "model.moe.router_options={k: 2, noisy: true}",
    ]
    full = train(load_config(None, overrides), tmp_path / "full", progress=False)

    real_lr_at = loop_mod.lr_at

    def crash_at_step_4(step, **kw):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_lr_at(step, **kw)

    monkeypatch.setattr(loop_mod, "lr_at", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(loop_mod, "lr_at", real_lr_at)
    resumed = train(load_config(None, overrides), tmp_path / "crashed", resume=True, progress=False)

    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert resumed["val_loss"] == full["val_loss"]
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
        if json.loads(ln)["split"] == "train"
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.router_options.threshold=1.5", "threshold"),
        ("model.moe.router_options.threshold=0", "threshold"),
        ("model.moe.router=nope", "router"),
        ("model.moe.num_experts=0", "num_experts"),
        ("model.moe.capacity_factor=-1", "capacity_factor"),
        ("model.bogus=1", "model.bogus"),
        ("train.lr=0", "train.lr"),
        ("train.steps=abc", "train.steps"),
    ],
)
def test_bad_arguments_exit_2_and_name_the_argument(tmp_path, corpus, capsys, override, message):
    code = main(
        ["train", "--run-dir", str(tmp_path / "r"), "--data", corpus, "--no-progress"]
        + sets("train.steps=1", override)
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_eval_and_resume_of_missing_runs_are_clear_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "nope"), "--resume"]) == 2
    assert "resume" in capsys.readouterr().err


def test_module_entry_point_lists_routers():
    out = subprocess.run(
        [sys.executable, "-m", "xmoe", "routers"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert {"threshold", "topk"} <= set(names)
