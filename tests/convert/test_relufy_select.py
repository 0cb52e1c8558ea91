"""ReLU-fication (convert/relufy.py), the select router, and the full pipeline with both."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import converted, hidden, random_batches, save_local_bert, tiny_bert, tiny_llama  # noqa: E402

from xmoe.cli import main  # noqa: E402
from xmoe.convert import load_converted, save_converted, set_threshold  # noqa: E402
from xmoe.convert.convert import ConvertConfig, converted_ffns  # noqa: E402
from xmoe.convert.relufy import relufy  # noqa: E402
from xmoe.convert.router import SliceRouter  # noqa: E402


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_relufy_swaps_the_activation_for_relu(make):
    model = make()
    batches = random_batches()
    gelu_out = hidden(model, batches[0])
    assert relufy(model) == 2
    assert model.config.hidden_act == "relu"
    relu_out = hidden(model, batches[0])
    assert not torch.allclose(relu_out, gelu_out, atol=1e-4)
    # brute force for one FFN: ReLU of the first layer
    if make is tiny_bert:
        inter = model.encoder.layer[0].intermediate
        x = torch.randn(5, inter.dense.in_features)
        torch.testing.assert_close(inter(x), torch.relu(inter.dense(x)))


def test_relufied_conversion_is_exact_at_t1_and_reloads_with_relu(tmp_path):
    model = tiny_bert()
    batches = random_batches()
    relufy(model)
    relu_out = hidden(model, batches[0])
    from xmoe.convert import convert_model

    manifest = convert_model(model, ConvertConfig(num_experts=4, calib_tokens=64), batches)
    set_threshold(model, 1.0)
    torch.testing.assert_close(hidden(model, batches[0]), relu_out, atol=1e-5, rtol=1e-5)
    assert converted_ffns(model)[0].experts.act.builtin == "relu"
    save_converted(model, tmp_path / "c", manifest)
    loaded, _, _ = load_converted(tmp_path / "c", with_tokenizer=False)
    set_threshold(loaded, 0.5)
    set_threshold(model, 0.5)
    torch.testing.assert_close(hidden(loaded, batches[0]), hidden(model, batches[0]))


def test_sigmoid_score_share_is_normalised_sigmoid():
    r = SliceRouter(6, 3, threshold=0.5, score="sigmoid")
    with torch.no_grad():
        r.weight.normal_()
    x = torch.randn(4, 6)
    p = torch.sigmoid(x @ r.weight.T + r.bias)
    torch.testing.assert_close(r.share(x), p / p.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="score"):
        SliceRouter(6, 3, score="tanh")


def test_select_router_learns_the_oracle_keep_set_and_round_trips(tmp_path):
    model, _, batches, manifest = converted(
        "bert", experts=4, steps=200, router_target="select", label_threshold=0.5
    )
    for layer in manifest["layers"]:
        assert "router_bce" in layer
        # better than always predicting the majority label per expert
        assert layer["router_label_agreement"] > 0.7
    assert converted_ffns(model)[0].router.score == "sigmoid"
    save_converted(model, tmp_path / "c", manifest)
    loaded, _, _ = load_converted(tmp_path / "c", with_tokenizer=False)
    assert converted_ffns(loaded)[0].router.score == "sigmoid"
    set_threshold(loaded, 0.6)
    set_threshold(model, 0.6)
    torch.testing.assert_close(hidden(loaded, batches[0]), hidden(model, batches[0]))


def test_config_rejects_bad_new_fields():
    for kw, flag in [
        ({"router_target": "mass"}, "--router-target"),
        ({"label_threshold": 0.0}, "--label-threshold"),
        ({"refit_ridge": 0.0}, "--refit-ridge"),
        ({"flop_budget": 1.5}, "--flop-budget"),
    ]:
        with pytest.raises(ValueError, match=flag):
            ConvertConfig(**kw).validate()
    with pytest.raises(TypeError, match="--relufy"):
        ConvertConfig(relufy="yes").validate()


def test_cli_relufy_refit_budget_select_finetune_then_eval_saved(tmp_path, capsys):
    base_dir, out = save_local_bert(tmp_path / "base"), tmp_path / "conv"
    argv = ["convert", "--model", str(base_dir), "--experts", "4", "--out", str(out)]
    argv += ["--calib-tokens", "300", "--router-steps", "20", "--threads", "1", "--no-progress"]
    argv += ["--relufy", "--refit", "--flop-budget", "0.6", "--router-target", "select"]
    argv += ["--finetune-steps", "2", "--finetune-params", "all"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "relufied" in printed and "FLOP budget 0.6" in printed and "sparse refit" in printed
    manifest = json.loads((out / "xmoe_convert.json").read_text())
    assert manifest["layer_thresholds"] == manifest["flop_budget"]["thresholds"]
    assert manifest["finetune"]["params"] == "all"
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu"
    argv = ["convert-eval", str(out), "--thresholds", "saved,1.0", "--no-speed", "--no-progress"]
    argv += ["--shakespeare", "12", "--stdlib", "8", "--threads", "1", "--routers", "learned"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| saved |" in printed
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert rows[0]["thresholds_per_layer"] == manifest["layer_thresholds"]
    assert main(argv[:2] + ["--thresholds", "saved,0"]) == 2
    assert "--thresholds" in capsys.readouterr().err
    bad = ["convert", "--model", str(base_dir), "--out", str(tmp_path / "x"), "--experts", "4"]
    assert main(bad + ["--finetune-steps", "1", "--finetune-params", "some"]) == 2
    assert "--finetune-params" in capsys.readouterr().err
