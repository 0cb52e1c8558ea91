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


def test_ablation_rows_change_one_choice_of_xmoe64_each():
    import math

    from xmoe.experiments.paper import ablation_rows

    rows = {r.name: r.overrides for r in ablation_rows(512, 128)}
    base = rows["default"]
    assert base["model.moe.num_experts"] == 64 and base["model.moe.d_expert"] == 64
    assert base["model.moe.router_options"] == {"threshold": 0.9}
    for name, o in rows.items():
        assert o["model.moe.num_experts"] * o["model.moe.d_expert"] == 8 * 512, name
        assert o["model.moe.router_options"]["threshold"] == 0.9, name
        changed = {k for k in set(o) | set(base) if o.get(k) != base.get(k)}
        assert changed <= {
            "model.moe.router_options",
            "model.moe.capacity_factor",
            "model.moe.loss_coefs",
        }, name
        assert changed or name == "default", name
    linear = rows["linear_init"]["model.moe.router_options"]["init_std"]
    assert linear == pytest.approx(1 / math.sqrt(3 * 128), abs=1e-5)
    assert rows["reference"]["model.moe.capacity_factor"] == 8.0
    assert rows["reference"]["model.moe.router_options"]["init_std"] == linear
    assert rows["budget=8"]["model.moe.router_options"]["target_experts_per_token"] == 8.0
    assert rows["soft_count=0.01"]["model.moe.loss_coefs"] == {"soft_count": 0.01}
    for row in ablation_rows():
        load_config("configs/paper.yaml", row.overrides)


def test_preset_rows_names_the_accepted_presets():
    from xmoe.experiments.paper import preset_rows

    assert [r.name for r in preset_rows("paper", 512, 128)] == [r.name for r in paper_rows(512)]
    assert preset_rows("paper-ablation", 512, 128)[0].name == "default"
    with pytest.raises(ValueError, match=r"preset must be one of \('paper', 'paper-ablation'"):
        preset_rows("ablation", 512, 128)


def test_run_record_reads_drops_and_the_final_threshold_of_the_last_train_line(tmp_path):
    from xmoe.experiments.grid import run_record

    lines = [
        {"split": "train", "step": 10, "dropped_fraction": [0.5, 0.5], "threshold": [0.1, 0.1]},
        {"split": "val", "step": 10, "val_dropped_fraction": [0.0, 0.0]},
        {"split": "train", "step": 20, "dropped_fraction": [0.1, 0.3], "threshold": [0.6, 0.8]},
        {"split": "val", "step": 20, "final": True},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {"val_ppl": 10.0, "d_ff": 512, "moe_compute_ratio": 0.5}
    rec = run_record(Row("r"), 0, summary, 128, tmp_path)
    assert rec["train_dropped_fraction"] == pytest.approx(0.2)
    assert rec["final_threshold"] == pytest.approx(0.7)
    assert rec["moe_gflops_per_token"] == pytest.approx(0.5 * 4 * 128 * 512 / 1e9)
    bare = run_record(Row("r"), 0, summary, 128, tmp_path / "missing")
    assert bare["train_dropped_fraction"] is None and bare["final_threshold"] is None


def test_recipe_rows_hold_top2_flops_and_the_plot_marks_their_group(tmp_path):
    pytest.importorskip("matplotlib")
    from xmoe.experiments.grid import plot_pareto
    from xmoe.experiments.paper import RECIPE, recipe_rows

    (row,) = recipe_rows(512)
    o = row.overrides
    assert o["model.moe.num_experts"] == 64 and o["model.moe.d_expert"] == 64
    assert o["model.moe.router_options"]["target_experts_per_token"] == 8.0
    for key, value in RECIPE.items():
        assert o[f"model.moe.{key}"] == value
    assert row.name in [r.name for r in paper_rows(512)]
    table = [
        {"row": "top2", "group": "", "moe_compute_ratio": 1.0, "val_ppl": 117.0, "val_ppl_std": 2},
        {
            "row": row.name,
            "group": row.group,
            "moe_compute_ratio": 1.0,
            "val_ppl": 110.0,
            "val_ppl_std": 1.0,
        },
    ]
    assert plot_pareto(table, tmp_path / "p.png") == tmp_path / "p.png"
    assert (tmp_path / "p.png").stat().st_size > 1000
