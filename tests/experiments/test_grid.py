"""The grid's resume rules: run folders, then results.json records with a matching digest."""

from __future__ import annotations

import json
import shutil

import pytest

from xmoe.experiments.grid import Row, config_digest, recorded_runs, run_grid
from xmoe.train.config import load_config


def _fake_train(calls):
    def train(cfg, run_dir, overwrite, progress):
        calls.append((run_dir.name, cfg.train.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        summary = {
            "val_ppl": 100.0 + cfg.train.seed + cfg.model.moe.num_experts,
            "d_ff": cfg.model.d_ff,
            "moe_compute_ratio": 0.5,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    return train


ROWS = [Row("a", {"model.moe.num_experts": 4}), Row("b", {"model.moe.num_experts": 8})]


def _grid(out, calls, rows=ROWS, seeds=(0, 1), **kw):
    return run_grid(
        rows, list(seeds), out, config=None, progress=False, train_fn=_fake_train(calls), **kw
    )


def test_the_digest_ignores_threads_but_not_the_model():
    base = load_config(None)
    assert config_digest(base) == config_digest(load_config(None, {"train.threads": 2}))
    assert config_digest(base) != config_digest(load_config(None, {"model.d_model": 96}))
    assert config_digest(base) != config_digest(load_config(None, {"train.seed": 1}))


def test_a_fresh_clone_reruns_only_what_results_json_lacks(tmp_path):
    calls: list = []
    _grid(tmp_path, calls)
    assert len(calls) == 4
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: run folders are git-ignored
    calls.clear()
    records = _grid(tmp_path, calls)
    assert calls == [] and len(records) == 4
    # A changed configuration (here: more steps) is not the recorded run: it trains again.
    calls.clear()
    _grid(tmp_path, calls, overrides={"train.steps": 7})
    assert len(calls) == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert all(r["config_digest"] for r in saved["runs"])


def test_a_run_folder_records_the_digest_of_the_config_it_trained(tmp_path):
    calls: list = []
    _grid(tmp_path, calls, seeds=(0,))
    # Another plan reuses the finished folder (summary.json is trusted), but its record keeps
    # the digest of what was trained, so a fresh clone would rerun it under the new plan.
    calls.clear()
    _grid(tmp_path, calls, seeds=(0,), overrides={"train.steps": 7})
    assert calls == []
    shutil.rmtree(tmp_path / "runs")
    _grid(tmp_path, calls, seeds=(0,), overrides={"train.steps": 7})
    assert sorted(calls) == [("a-s0", 0), ("b-s0", 0)]


def test_runs_outside_the_plan_stay_in_results_json(tmp_path):
    calls: list = []
    _grid(tmp_path, calls)
    _grid(tmp_path, calls, rows=ROWS[:1], seeds=(0,))  # a --rows subset
    saved = recorded_runs(tmp_path)
    assert sorted(saved) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    table = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["row"] for r in table] == ["a"]


def test_a_rows_subset_adds_to_the_whole_table(tmp_path):
    calls: list = []
    _grid(tmp_path, calls, rows=ROWS[1:])  # b first, as an earlier pass
    _grid(tmp_path, calls, rows=ROWS[:1], table_rows=ROWS)  # then --rows a
    table = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["row"], r["seeds"]) for r in table] == [("a", 2), ("b", 2)]
    assert table[1]["val_ppl"] == 108.5  # b's recorded runs: 108 and 109
    text = (tmp_path / "results.md").read_text()
    assert "| a |" in text and "| b |" in text


def test_a_broken_results_json_is_named(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json"):
        _grid(tmp_path, [])


def test_granularity_rows_hold_top2_active_width():
    from xmoe.experiments.paper import granularity_rows

    rows = granularity_rows(512)
    assert [r.name for r in rows] == [
        "xmoe16@top2_flops",
        "xmoe32@top2_flops",
        "xmoe16+soft_count",
        "xmoe32+soft_count",
    ]
    for row in rows:
        o = row.overrides
        n, width = o["model.moe.num_experts"], o["model.moe.d_expert"]
        assert n * width == 8 * 512
        if row.name.endswith("@top2_flops"):
            # top-2 over 16 x 256 computes 512 hidden units per token.
            assert o["model.moe.router_options"]["target_experts_per_token"] * width == 512
        else:  # the sparsity recipe of xmoe64+soft_count, no budget
            assert o["model.moe.loss_coefs"] == {"soft_count": 0.01}
            assert "target_experts_per_token" not in o["model.moe.router_options"]
