"""``xmoe export-hf``: a tiny qwen3_moe ``xmoe train`` run, exported, loaded by transformers."""

import json

import pytest
import torch

from conftest import sets
from xmoe.cli import main

transformers = pytest.importorskip("transformers")

QWEN = (
    "model.arch=qwen3_moe",
    "model.activation=swiglu",
    "model.moe.activation=swiglu",
    "model.moe.bias=false",
    "model.moe.router=topk",
    "model.moe.router_options={k: 2}",
    "train.steps=3",
    "train.eval_every=3",
)


def train(tmp_path, corpus, name, *items):
    run = tmp_path / name
    args = ["train", "--run-dir", str(run), "--data", corpus, "--no-progress"]
    assert main(args + sets(*items)) == 0
    return run


def test_export_hf_of_a_trained_run_loads_in_plain_transformers(tmp_path, corpus, capsys):
    from xmoe.train.run_dir import load_run

    run = train(tmp_path, corpus, "qwen", *QWEN)
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export-hf", str(run), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "exactly" in printed
    check = json.loads(printed.strip().splitlines()[-1])
    assert check["max_abs_diff"] <= 1e-4 and check["exact_routing"]

    loaded = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "ROMEO. What light"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == loaded.data.tokenizer.encode(text).ids
    with torch.no_grad():
        ours = loaded.model(ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, rtol=0, atol=1e-4)
    assert main(["export-hf", str(run), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert main(["export-hf", str(run), "--out", str(out), "--overwrite"]) == 0


def test_export_hf_of_a_gpt_arch_run_is_a_clear_error(tmp_path, corpus, capsys):
    run = train(tmp_path, corpus, "gpt", "train.steps=1", "train.eval_every=1")
    capsys.readouterr()
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.arch='gpt'" in err and "model.arch=qwen3_moe" in err
    assert not (tmp_path / "hf").exists()
