"""``xmoe hf-eval`` and ``xmoe hf-sweep`` on a tiny saved model (and the evaluation they use)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_moe_tiny import save_with_tokenizer, threshold_qwen_gpt, tiny_model, token_batch

import xmoe.hf as xh
from xmoe.cli.main import main
from xmoe.hf.evaluate import evaluate, time_forwards

SMALL = ["--max-tokens", "512", "--calib-tokens", "256", "--seq-len", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    save_with_tokenizer("qwen3_moe", path)
    return path


def test_perplexity_equals_hf_own_loss_at_native_routing():
    model = tiny_model("deepseek_v3")
    windows = token_batch(0, batch=3, length=13)
    with torch.no_grad():
        ref = model(input_ids=windows[:, :-1], labels=windows[:, :-1]).loss
        nll = torch.nn.functional.cross_entropy(
            model(input_ids=windows[:, :-1]).logits.flatten(0, 1), windows[:, 1:].flatten()
        )
    assert torch.isfinite(ref)
    xh.patch(model)
    out = evaluate(model, windows, batch_size=2)
    assert out["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert out["tokens"] == 36 and out["experts_per_token"] == [2.0, 2.0]
    assert out["expert_flop_fraction"] == pytest.approx(1.0)


def test_time_forwards_runs_setup_untimed_and_every_variant():
    calls = []
    out = time_forwards(
        {"a": (lambda: calls.append("setup a"), lambda: calls.append("a")), "b": (None, lambda: 0)},
        repeats=2,
        warmup=1,
    )
    assert set(out) == {"a", "b"} and calls.count("a") == 3 and calls.count("setup a") == 3


def test_hf_eval_threshold_and_budget(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["hf-eval", str(model_dir), "--threshold", "0.6", *SMALL, "--repeats", "1"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts/token per layer" in text and "| blocks | xmoe native |" in text
    row = json.loads(out.read_text())
    assert row["rule"] == "threshold" and len(row["experts_per_token"]) == 2
    assert row["native_check"] < 1e-5
    assert main(["hf-eval", str(model_dir), "--flop-fraction", "0.75", "--entropy-k", *SMALL,
                 "--no-time"]) == 0  # fmt: skip
    assert "entropy_k" in capsys.readouterr().out
    out = tmp_path / "capped.json"
    args = ["hf-eval", str(model_dir), "--threshold", "0.99", "--max-experts", "2", *SMALL]
    assert main([*args, "--no-time", "--json", str(out)]) == 0
    assert max(json.loads(out.read_text())["experts_per_token"]) == 2.0


def test_hf_sweep_writes_table_and_plot(model_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["hf-sweep", str(model_dir), "--thresholds", "0.5,0.9", "--flop-fractions", "0.75",
            *SMALL, "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "sweep.json").read_text())
    rules = [r["rule"] for r in result["rows"]]
    assert rules[:6] == ["native", "topk", "threshold", "threshold", "budget", "budget"]
    assert rules[6:] == ["budget", "budget", "budget", "entropy_k"]
    series = [r["series"] for r in result["rows"][4:9]]
    assert series == ["budget", "budget capped", "budget global", "budget top-k",
                      "budget top-k global"]  # fmt: skip
    assert max(result["rows"][7]["experts_per_token"]) <= 2  # within the native top-2
    capped = result["rows"][5]
    assert capped["series"] == "budget capped" and max(capped["experts_per_token"]) <= 2
    assert result["rows"][0]["ppl_delta"] == 0
    assert (out / "sweep.png").stat().st_size > 1000
    md = (out / "sweep.md").read_text()
    assert "| budget | 75% FLOPs |" in md and "speed vs HF default" in md and "| blocks |" in md


def test_bad_inputs_are_clear_errors(model_dir, tmp_path, capsys):
    assert main(["hf-eval", str(tmp_path / "missing"), *SMALL]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["hf-eval", str(model_dir), "--entropy-k", *SMALL]) == 2
    assert "--entropy-k needs" in capsys.readouterr().err
    assert main(["hf-eval", str(model_dir), "--threshold", "0.5,x", *SMALL]) == 2


def test_hf_sweep_of_a_threshold_export_has_the_restored_row(tmp_path):
    from xmoe.data.tokenizer import train_tokenizer
    from xmoe.hf.export import export_model

    out = export_model(threshold_qwen_gpt(257, 0.5), tmp_path / "hf", train_tokenizer(["a"], 257))
    skip = ["--no-time", "--no-capped", "--no-global", "--no-entropy", "--no-within-topk"]
    args = ["hf-sweep", str(out), "--thresholds", "0.5", "--flop-fractions", "0.5", *skip,
            *SMALL, "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    by = {r["setting"]: r for r in rows}
    assert by["native"]["experts_per_token"] == [4.0, 4.0]  # exported as top-4 (k = E)
    assert by["restored"]["ppl"] == pytest.approx(by["t=0.5"]["ppl"], rel=1e-6)
    assert by["restored"]["experts_per_token"] == by["t=0.5"]["experts_per_token"]
