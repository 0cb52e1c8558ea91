"""Generation with a KV cache computes what the full forward computes, one token at a time."""

from __future__ import annotations

import pytest
import torch

from xmoe.models import GPT, GPTConfig
from xmoe.moe.config import MoEConfig


def _model(router: str = "threshold", **moe) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=64,
        block_size=16,
        n_layer=2,
        n_head=2,
        d_model=16,
        d_ff=32,
        moe=MoEConfig(num_experts=4, d_expert=8, router=router, **moe),
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize("router", ["threshold", "topk", "hash"])
def test_incremental_logits_equal_the_full_forward(router):
    model = _model(router)
    idx = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(3)
        pieces = [model(idx[:, :5], cache=cache).logits]  # a prefill, then one token per step
        pieces += [model(idx[:, t : t + 1], cache=cache).logits for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 16


def test_a_multi_token_chunk_after_a_prefill_is_causal():
    model = _model()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(2)
        a = model(idx[:, :4], cache=cache).logits
        b = model(idx[:, 4:12], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_cached_generation_matches_uncached_within_the_window():
    model = _model()
    prompt = torch.randint(0, 64, (2, 4))
    torch.manual_seed(5)
    cached = model.generate(prompt, 12, top_k=1)
    torch.manual_seed(5)
    plain = model.generate(prompt, 12, top_k=1, use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (2, 16)


def test_generation_slides_past_the_window():
    model = _model()
    out = model.generate(torch.randint(0, 64, (1, 3)), 40)
    assert out.shape == (1, 43) and int(out.max()) < 64


def test_cache_overflow_and_bad_arguments_are_refused():
    model = _model()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="idx must be"):
        model.generate(torch.zeros(2, dtype=torch.long), 3)
