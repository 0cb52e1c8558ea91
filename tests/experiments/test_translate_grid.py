"""The translation grid's rows and its table (the runs themselves are in docs/translation.md)."""

from __future__ import annotations

import math

import pytest

from xmoe.experiments.translate_grid import ROWS, aggregate, results_table, row_named, run_config


def _active_width(cfg) -> float:
    """Expert width per token the row computes at its nominal experts/token."""
    m = cfg.model.moe
    k = {"topk": m.router_options.get("k", 1)}.get(m.router)
    if k is None:
        k = m.router_options.get("target_experts_per_token")
    return k * m.d_expert


def test_every_row_builds_a_valid_translate_config(tmp_path):
    for row in ROWS:
        cfg = run_config(row, 0, tmp_path / "corpus", 10, {})
        assert cfg.task == "translate"
        assert cfg.train.steps == 10
        if row.name != "dense":
            # equal total expert width E * d_ff in every MoE row
            assert cfg.model.moe.num_experts * cfg.model.moe.d_expert == 8 * 512


def test_budget_row_sits_at_top2_flops(tmp_path):
    top2 = run_config(row_named("top2"), 0, tmp_path, None, {})
    budget = run_config(row_named("xmoe32@top2_flops"), 0, tmp_path, None, {})
    assert budget.model.moe.router == "threshold"
    assert _active_width(budget) == _active_width(top2) == 2 * 256


def test_soft_count_rows_have_the_loss(tmp_path):
    for name, experts in (("xmoe32+soft_count", 32), ("xmoe16+soft_count", 16)):
        cfg = run_config(row_named(name), 0, tmp_path, None, {})
        assert cfg.model.moe.loss_coefs == {"soft_count": 0.01}
        assert cfg.model.moe.num_experts == experts
        assert "target_experts_per_token" not in cfg.model.moe.router_options


def test_unknown_row_names_the_choices():
    with pytest.raises(ValueError, match="row must be one of"):
        row_named("top3")


def _record(row, seed, bleu):
    return {
        "row": row,
        "seed": seed,
        "encoder_ffn": row,
        "test_bleu": bleu,
        "test_chrf": 2 * bleu,
        "val_bleu": bleu - 1,
        "val_loss": 1.0 + seed,
        "enc_moe_flops_per_token": 2e5,
        "experts_per_token_per_layer": [1.0 + seed, 9.0],
        "encoder_moe_layers": 1,
        "train_time_s": 10.0 * (seed + 1),
        "test_copy_bleu": 36.0,
        "test_copy_chrf": 65.0,
        "val_copy_bleu": 38.0,
    }


def test_aggregate_is_mean_and_sample_std_then_copy():
    lines = aggregate([_record("top2", 0, 10.0), _record("top2", 1, 20.0)])
    top2, copy = lines
    assert top2["seeds"] == 2 and top2["test_bleu"] == 15.0
    assert math.isclose(top2["test_bleu_std"], math.sqrt(50.0))
    assert top2["ept_per_layer"] == "1.50"  # encoder MoE layers only
    assert top2["train_time_s"] == 15.0
    assert copy["row"] == "copy" and copy["test_bleu"] == 36.0
    table = results_table([_record("top2", 0, 10.0)], "xmoe translate-compare")
    assert table.startswith("Command: `xmoe translate-compare`")
    assert "10.00 ± 0.00" in table and "| copy |" in table


def test_aggregate_of_nothing_is_empty():
    assert aggregate([]) == []
