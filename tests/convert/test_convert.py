"""Whole-model conversion (convert/convert.py): exactness at t = 1, thresholds, router fit."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import (
    D_FF,
    LAYERS,
    D,
    converted,
    hidden,
    random_batches,
    tiny_bert,
)

from xmoe.convert import (
    ConvertConfig,
    capture_ffn_inputs,
    convert_model,
    converted_ffns,
    set_mode,
    set_threshold,
)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_all_experts_selected_reproduces_dense_model(name):
    model, dense_out, batches, manifest = converted(name)
    assert manifest["adapter"] == name
    ffns = converted_ffns(model)
    assert len(ffns) == LAYERS
    assert not any(
        isinstance(m, torch.nn.Linear) and m.out_features == D_FF for m in model.modules()
    )
    set_threshold(model, 1.0)
    out = hidden(model, batches[0])
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    assert all(f.last_pairs == f.last_tokens * 4 for f in ffns)  # every expert ran
    # The oracle router keeps everything at t = 1 too.
    set_mode(model, "oracle")
    torch.testing.assert_close(hidden(model, batches[0]), dense_out, atol=1e-5, rtol=1e-5)


def test_lower_threshold_keeps_fewer_experts_and_t1_is_exact():
    model, dense_out, batches, _ = converted("bert", experts=8, steps=50)
    ffns = converted_ffns(model)
    pairs = {}
    for t in (1.0, 0.9, 0.5, 0.1):
        set_threshold(model, t)
        out = hidden(model, batches[1])
        pairs[t] = sum(f.last_pairs for f in ffns)
        tokens = sum(f.last_tokens for f in ffns)
        if t == 1.0:
            full = out
    assert pairs[1.0] == tokens * 8
    assert pairs[1.0] > pairs[0.9] >= pairs[0.5] >= pairs[0.1] >= tokens  # at least 1 per token
    assert pairs[0.5] < pairs[1.0]
    set_threshold(model, 1.0)
    torch.testing.assert_close(hidden(model, batches[1]), full)


def test_learned_router_beats_the_input_independent_guess():
    model = tiny_bert()
    x = capture_ffn_inputs(model, random_batches())
    assert x[0].shape == (3 * (4 * 12 - 6), D)  # padding rows skipped
    convert_model(model, ConvertConfig(num_experts=4, router_steps=200, calib_tokens=500), inputs=x)
    for ffn, xi in zip(converted_ffns(model), x):
        q = ffn.oracle_share(xi)
        kl = lambda p, q=q: (q * (q.log() - p.log())).sum(-1).mean()
        prior = q.mean(0, keepdim=True).expand_as(q)  # best input-independent prediction
        with torch.no_grad():
            assert kl(ffn.router.logits(xi).softmax(-1)) < 0.8 * kl(prior)


def test_experts_must_divide_d_ff():
    with pytest.raises(ValueError, match=r"--experts\) = 5 does not divide .*d_ff=32"):
        convert_model(tiny_bert(), ConvertConfig(num_experts=5), random_batches())


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(split="kmeans"), "--split"),
        (dict(router="best"), "--router"),
        (dict(threshold=0.0), "threshold"),
        (dict(calib_tokens=0), "--calib-tokens"),
        (dict(num_experts=0), "--experts"),
    ],
)
def test_bad_config_values_name_the_argument(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        convert_model(tiny_bert(), ConvertConfig(**kw), random_batches())


def test_set_threshold_rejects_out_of_range():
    model, *_ = converted("gpt2")
    with pytest.raises(ValueError, match="threshold"):
        set_threshold(model, 1.5)
    with pytest.raises(ValueError, match="mode"):
        set_mode(model, "sparse")
