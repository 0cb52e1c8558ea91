"""ConvertedFFN (convert/ffn.py): a dense FFN sliced into experts is an exact MoE at t = 1."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import (
    MODELS,
    D,
    tiny_bert,
)

from xmoe.convert import (
    ConvertedFFN,
    find_ffns,
    split_neurons,
)
from xmoe.convert.ffn import DenseFFN
from xmoe.moe.kernels.native_ffn import native_available


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_converted_ffn_matches_dense_ffn_module_by_module(name):
    model = MODELS[name]()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    x = torch.randn(7, D)
    groups = split_neurons("random", dense, 8, seed=3)
    ffn = ConvertedFFN.from_dense(dense, groups, threshold=1.0)
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    ffn.set_mode("oracle")  # the same t = 1 through the experts (learned mode short-cuts)
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    assert ffn.last_routing is not None and ffn.last_pairs == 7 * 8
    ffn.set_mode("learned")
    set_dense = ConvertedFFN.from_dense(dense, groups, mode="dense")
    torch.testing.assert_close(set_dense(x), dense(x), atol=1e-5, rtol=1e-5)
    # The sliced experts are a permutation of the neurons: to_dense() holds the same rows.
    back = ffn.to_dense()
    perm = groups.flatten()
    torch.testing.assert_close(back.w1, dense.w1[perm])
    torch.testing.assert_close(back.w2, dense.w2[:, perm])


@pytest.mark.parametrize(
    "name, backend", [("bert", "segment"), ("gpt2", "loop"), ("llama", "segment")]
)
def test_hf_activation_is_used_exactly(name, backend):
    model = MODELS[name]()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    ffn = ConvertedFFN.from_dense(dense, split_neurons("random", dense, 4), threshold=1.0)
    ffn.set_mode("oracle")  # through the experts: at t = 1 learned mode runs the dense FFN
    if backend == "segment" and native_available():
        backend = "native"  # a built-in activation runs a hand-written kernel: native first
    assert ffn.experts.resolve_backend(torch.float32) == backend
    x = 3 * torch.randn(64, D)  # pre-activations well into the nonlinear range
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    if name == "gpt2":  # the exact GELU would be measurably off: the test can fail
        exact = DenseFFN(dense.w1, dense.b1, dense.w2, dense.b2, torch.nn.functional.gelu)
        assert (exact(x) - dense(x)).abs().max() > 1e-4


def test_oracle_keeps_experts_with_most_activation_mass():
    model = tiny_bert()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    ffn = ConvertedFFN.from_dense(dense, split_neurons("random", dense, 4), mode="oracle")
    x = torch.randn(6, D)
    mass = ffn.expert_mass(x)
    ffn.set_threshold(1e-6)  # keep only the top expert
    ffn.record_kept = True
    y = ffn(x)
    assert torch.equal(ffn.last_kept, torch.ones(6, dtype=torch.long))
    top = mass.argmax(-1)
    want = (
        torch.stack(
            [
                ffn.experts(x[i : i + 1], torch.nn.functional.one_hot(top[i], 4), top[i : i + 1])[0]
                for i in range(6)
            ]
        )
        + ffn.out_bias
    )
    torch.testing.assert_close(y, want)


def test_learned_mode_at_t1_short_cuts_to_the_dense_ffn():
    model = MODELS["bert"]()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    ffn = ConvertedFFN.from_dense(dense, split_neurons("random", dense, 4), threshold=1.0)
    x = torch.randn(5, D)
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    assert ffn.last_routing is None and ffn.last_pairs == 5 * 4
    ffn.set_threshold(0.5)
    ffn(x)
    assert ffn.last_routing is not None and ffn.last_pairs < 5 * 4
