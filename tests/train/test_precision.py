"""train.precision: bf16 autocast trains with fp32 master weights; auto follows the hardware."""

from __future__ import annotations

import pytest
import torch

import xmoe.train.precision as precision
from conftest import TINY
from xmoe.train.config import load_config
from xmoe.train.loop import train


def test_auto_is_bf16_only_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"
    assert precision.resolve_precision("bf16") == "bf16"
    assert precision.resolve_precision("fp32") == "fp32"


def test_bad_precision_is_refused_naming_the_key(corpus):
    with pytest.raises(ValueError, match="train.precision"):
        load_config(None, TINY, {"train.precision": "fp16", "data.path": corpus})


def test_bf16_training_keeps_fp32_weights_and_fp32_routing(tmp_path, corpus):
    cfg = load_config(
        None,
        TINY,
        {"train.steps": 3, "train.precision": "bf16", "data.path": corpus, "train.eval_every": 10},
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(summary["val_loss"]))
    from xmoe.train.run_dir import load_run

    model = load_run(tmp_path / "run").model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(8, model.cfg.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = model.moe_layers[0].router(x)
    assert routing.weight.dtype == torch.float32
