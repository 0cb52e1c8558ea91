"""Where HF models keep their FFNs (convert/adapters.py): BERT, GPT-2, Llama."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import (
    D_FF,
    D,
    converted,
    tiny_gpt2,
)

from xmoe.convert import (
    ConvertConfig,
    ConvertedFFN,
    convert_model,
    find_ffns,
)


def test_gpt2_conv1d_weights_are_transposed_to_linear_layout():
    model = tiny_gpt2()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    assert dense.w1.shape == (D_FF, D) and dense.w2.shape == (D, D_FF)
    x = torch.randn(5, D)
    mlp = site.owner
    torch.testing.assert_close(dense(x), mlp.c_proj(mlp.act(mlp.c_fc(x))))


def test_bert_keeps_layernorm_and_residual():
    model, *_ = converted("bert")
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, ConvertedFFN)
    assert isinstance(layer.output.dense, torch.nn.Identity)
    assert isinstance(layer.output.LayerNorm, torch.nn.LayerNorm)


def test_unsupported_architecture_names_the_model_class():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="unsupported architecture.*Weird"):
        convert_model(Weird(), ConvertConfig(num_experts=2), inputs=[])
