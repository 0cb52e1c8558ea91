"""Distillation of the expert slices at a fixed threshold (convert/finetune.py)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import (
    converted,
    hidden,
)

from xmoe.convert import (
    converted_ffns,
    set_threshold,
)


def test_distill_trains_only_the_expert_slices_and_improves_the_sparse_model():
    from xmoe.convert.finetune import distill

    model, dense_out, batches, _ = converted("bert", experts=4, steps=30)
    router_before = [f.router.weight.clone() for f in converted_ffns(model)]
    other_before = model.embeddings.word_embeddings.weight.clone()
    w1_before = converted_ffns(model)[0].experts.w1.clone()
    set_threshold(model, 0.5)
    err = lambda: float((hidden(model, batches[0]) - dense_out).pow(2).mean())
    before = err()
    info = distill(model, batches, threshold=0.5, steps=40, lr=3e-3)
    assert info["loss_last"] < info["loss_first"]
    assert err() < before  # closer to the dense model at the tuned threshold
    assert not torch.equal(converted_ffns(model)[0].experts.w1, w1_before)
    for f, w in zip(converted_ffns(model), router_before):
        assert torch.equal(f.router.weight, w)
    assert torch.equal(model.embeddings.word_embeddings.weight, other_before)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert [f.threshold for f in converted_ffns(model)] == [0.5, 0.5]
    with pytest.raises(ValueError, match="--finetune-steps"):
        distill(model, batches, threshold=0.5, steps=0)
