"""Issue 17 item 8: ``xmoe plot RUN`` writes PNGs from metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from conftest import sets
from xmoe.cli import main
from xmoe.train.plots import curves

pytest.importorskip("matplotlib")


def test_plot_writes_loss_perplexity_and_experts_per_token_pngs(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--data", corpus, "--no-progress"]
    assert main(args + sets("train.steps=4", "train.eval_every=2")) == 0
    assert main(["plot", str(run)]) == 0
    names = {"loss.png", "perplexity.png", "experts_per_token.png"}
    assert {p.name for p in (run / "plots").iterdir()} == names
    for name in names:
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "experts_per_token.png" in capsys.readouterr().out
    out = tmp_path / "elsewhere"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == names


def test_curves_count_a_resumed_step_once_and_skip_non_finite_values():
    records = [
        {"split": "train", "step": 1, "loss": 3.0, "lm_loss": 2.0, "experts_per_token": [1.0, 2.0]},
        {"split": "train", "step": 2, "loss": float("nan"), "experts_per_token": [1.5, 2.5]},
        {"split": "train", "step": 1, "loss": 3.0, "lm_loss": 1.0, "experts_per_token": [1.0, 2.0]},
        {
            "split": "val",
            "step": 2,
            "val_loss": 1.5,
            "val_ppl": 4.48,
            "val_experts_per_token": [1.2],
        },
    ]
    c = curves(records)
    assert c["train_loss"] == [(1, 1.0)]  # lm_loss preferred; the later step-1 record wins
    assert c["train_ept_layer1"] == [(1, 2.0), (2, 2.5)]
    assert c["val_loss"] == [(2, 1.5)] and c["val_ept_layer0"] == [(2, 1.2)]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "does not exist"),
        ("empty", "has no metrics.jsonl"),
        ("blank", "holds no training or validation records"),
    ],
)
def test_plot_of_a_run_without_metrics_is_a_clear_error(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "blank":
        (run / "metrics.jsonl").write_text(json.dumps({"note": 1}) + "\n{cut sho")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
