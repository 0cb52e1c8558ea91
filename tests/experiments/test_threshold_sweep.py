"""``xmoe eval --threshold`` / ``--sweep-threshold`` on a tiny t = 1 run."""

import json

import pytest

from conftest import sets
from xmoe.cli import main


@pytest.fixture(scope="module")
def t1_run(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("t1") / "run"
    args = ["train", "--run-dir", str(run), "--data", str(corpus), "--no-progress"]
    overrides = sets(
        "train.steps=3", "train.eval_every=100", "model.moe.router_options.threshold=1.0"
    )
    assert main(args + overrides) == 0
    return run


def _eval(capsys, *args):
    capsys.readouterr()
    code = main(["eval", *map(str, args), "--max-tokens", "256"])
    return code, capsys.readouterr()


def test_lower_threshold_at_eval_uses_fewer_experts(t1_run, capsys):
    code, out = _eval(capsys, t1_run)
    assert code == 0
    full = json.loads(out.out)
    assert full["val_experts_per_token"] == [4.0, 4.0]  # t = 1: every expert
    assert full["val_moe_compute_ratio"] == pytest.approx(1.0)
    code, out = _eval(capsys, t1_run, "--threshold", "0.3")
    assert code == 0
    sparse = json.loads(out.out)
    assert max(sparse["val_experts_per_token"]) < 4.0
    assert sparse["val_moe_compute_ratio"] < full["val_moe_compute_ratio"]
    # The checkpoint is untouched: evaluating at the trained t again gives the same numbers.
    code, out = _eval(capsys, t1_run)
    assert json.loads(out.out)["val_loss"] == full["val_loss"]


def test_renormalize_changes_the_combine_not_the_selection(t1_run, capsys):
    _, a = _eval(capsys, t1_run, "--threshold", "0.5", "--renormalize")
    _, b = _eval(capsys, t1_run, "--threshold", "0.5", "--no-renormalize")
    a, b = json.loads(a.out), json.loads(b.out)
    # Layer 1 sees the same inputs, so it selects the same experts; later layers see the
    # renormalised outputs of earlier ones.
    assert a["val_experts_per_token"][0] == b["val_experts_per_token"][0]
    assert a["val_loss"] != b["val_loss"]


def test_sweep_writes_table_json_and_plot(t1_run, capsys, tmp_path):
    out_dir = tmp_path / "sweep"
    code, out = _eval(capsys, t1_run, "--sweep-threshold", "1.0,0.5", "--out", out_dir)
    assert code == 0, out.err
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [(r["threshold"], r["renormalize"]) for r in rows] == [
        (1.0, False),
        (0.5, False),
        (1.0, True),
        (0.5, True),
    ]
    by = {(r["threshold"], r["renormalize"]): r for r in rows}
    assert by[(0.5, False)]["moe_compute_ratio"] < by[(1.0, False)]["moe_compute_ratio"]
    # At t = 1 the kept probabilities already sum to 1: renormalising changes nothing.
    assert by[(1.0, True)]["val_loss"] == pytest.approx(by[(1.0, False)]["val_loss"], rel=1e-5)
    assert "| 0.5 |" in (out_dir / "sweep.md").read_text()
    assert (out_dir / "sweep.png").stat().st_size > 1000
    assert "moe_compute_ratio" in out.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["--threshold", "0"], "--threshold must be in (0, 1]"),
        (["--sweep-threshold", "0.9,abc"], "not a number"),
        (["--sweep-threshold", "0.9,2"], "--sweep-threshold must be in (0, 1]"),
        (["--threshold", "0.5", "--sweep-threshold", "0.5"], "not both"),
        (["--renormalize"], "only apply with --threshold"),
    ],
)
def test_bad_threshold_arguments_exit_2_with_a_clear_message(t1_run, capsys, args, message):
    code, out = _eval(capsys, t1_run, *args)
    assert code == 2
    assert message in out.err


def test_threshold_on_a_topk_run_is_refused(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--data", str(corpus), "--no-progress"]
    overrides = sets("train.steps=1", "model.moe.router=topk", "model.moe.router_options={k: 2}")
    assert main(args + overrides) == 0
    code, out = _eval(capsys, run, "--threshold", "0.5")
    assert code == 2 and "threshold router" in out.err
