"""The paper preset: rows at equal total expert width, a resumable grid, mean ± std tables."""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from xmoe.experiments.paper import Row, aggregate, paper_rows, run_grid
from xmoe.train.config import load_config


def test_every_moe_row_holds_eight_times_the_dense_width():
    rows = {r.name: r for r in paper_rows(512)}
    assert list(rows)[:3] == ["dense", "switch", "top2"]
    for name, row in rows.items():
        o = row.overrides
        if name == "dense":
            assert o == {"model.moe_every": 0}
            continue
        assert o["model.moe.num_experts"] * o["model.moe.d_expert"] == 8 * 512, name
    budget = rows["xmoe64@top2_flops"].overrides["model.moe.router_options"]
    # top-2 over 16 x 256 computes 512 hidden units per token: 8 experts of width 64.
    assert budget["target_experts_per_token"] == 8.0
    assert rows["switch"].overrides["model.moe.capacity_factor"] == 1.25


def test_the_rows_load_as_valid_configs():
    for row in paper_rows():
        cfg = load_config("configs/paper.yaml", row.overrides)
        assert cfg.model.moe_every in (0, 2)


def _fake_train(calls):
    def train(cfg, run_dir, overwrite, progress):
        calls.append((str(run_dir), cfg.train.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "val_ppl": 100.0 + cfg.train.seed + cfg.model.moe.num_experts / 100,
            "d_ff": cfg.model.d_ff,
            "moe_compute_ratio": None if cfg.model.moe_every == 0 else 0.5,
            "experts_per_token": 2.0,
            "experts_per_token_per_layer": [1.5, 2.5],
            "load_imbalance": 1.2,
            "train_tokens_per_s": 1000.0,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    return train


def test_grid_resumes_by_skipping_finished_runs(tmp_path):
    rows = [Row("dense", {"model.moe_every": 0}), Row("a", {"model.moe.num_experts": 8})]
    calls: list = []
    run_grid(
        rows,
        [0, 1],
        tmp_path,
        config=None,
        overrides=dict.fromkeys([]),
        progress=False,
        train_fn=_fake_train(calls),
    )
    assert len(calls) == 4 and {seed for _, seed in calls} == {0, 1}
    (tmp_path / "runs" / "a-s1" / "summary.json").unlink()  # an interrupted grid
    calls.clear()
    records = run_grid(
        rows, [0, 1], tmp_path, config=None, progress=False, train_fn=_fake_train(calls)
    )
    assert calls == [(str(tmp_path / "runs" / "a-s1"), 1)] and len(records) == 4
    table = aggregate(records, rows)
    dense, a = table
    assert dense["moe_compute_ratio"] == 1.0 and a["moe_compute_ratio"] == 0.5
    assert a["val_ppl"] == pytest.approx(100.58) and a["val_ppl_std"] == pytest.approx(0.7071, 1e-3)
    assert a["per_layer"] == "1.50 / 2.50" and a["seeds"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "| a | 2 | 100.58 |" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 4 and saved["rows"][1]["row"] == "a"


def test_a_bad_row_fails_before_any_training(tmp_path):
    rows = [Row("ok", {}), Row("bad", {"model.moe.no_such_key": 1})]
    calls: list = []
    with pytest.raises(ValueError, match="model.moe.no_such_key"):
        run_grid(rows, [0], tmp_path, config=None, progress=False, train_fn=_fake_train(calls))
    assert calls == []


def test_preset_cli_trains_a_tiny_grid_and_resumes(tmp_path, corpus, capsys):
    from xmoe.cli import main

    args = [
        "compare",
        "--preset",
        "paper",
        "--rows",
        "top2,xmoe64@top2_flops",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        f"data.path={corpus}",
    ]
    for item in [*TINY, "model.d_ff=32", "model.moe_every=2", "train.eval_every=10"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top2" in out and "xmoe64@top2_flops" in out
    assert (tmp_path / "pareto.png").exists()
    assert main(args) == 0  # everything finished: nothing trains again
    assert "==" not in capsys.readouterr().out
