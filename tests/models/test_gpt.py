"""The GPT with MoE FFNs: shapes, which blocks are MoE, losses, routing stats, generation."""

import pytest
import torch

from xmoe import MoE
from xmoe.models import GPT, GPTConfig, MoEConfig, routing_summary


def tiny_config(**overrides) -> GPTConfig:
    moe = MoEConfig(num_experts=4, d_expert=8, router_options={"threshold": 0.9})
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, moe=moe)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_moe_every_places_moe_in_every_nth_block():
    model = GPT(tiny_config(n_layer=4, moe_every=2))
    kinds = [isinstance(b.ffn, MoE) for b in model.blocks]
    assert kinds == [False, True, False, True]
    assert len(GPT(tiny_config(moe_every=0)).moe_layers) == 0


def test_forward_returns_logits_loss_and_one_routing_per_moe_layer():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (3, 16))
    out = model(idx, idx)
    assert out.logits.shape == (3, 16, 64)
    assert len(out.routings) == 2
    assert all(r.num_tokens == 48 for r in out.routings)
    out.loss.backward()
    assert model.blocks[0].ffn.router.weight.grad is not None


def test_model_loss_adds_weighted_router_losses():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.moe.loss_coefs = {"load_balance": 0.5, "z_loss": 0.25}
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16))
    out = model(idx, idx)
    expected = out.lm_loss + sum(
        (0.5 * r.losses["load_balance"] + 0.25 * r.losses["z_loss"]) / 2 for r in out.routings
    )
    torch.testing.assert_close(out.loss, expected)


def test_routing_summary_compute_ratio_uses_dense_width():
    model = GPT(tiny_config())
    summary = routing_summary(model.cfg, model.moe_layers, [2.0, 4.0], [0.0, 0.0])
    # ratio = ept * d_expert / d_ff averaged: (2*8/32 + 4*8/32) / 2 = 0.75
    assert summary["moe_compute_ratio"] == pytest.approx(0.75)


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_generate_appends_tokens_and_respects_block_size():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=20, top_k=5)
    assert out.shape == (1, 23)


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="n_head"):
        GPT(tiny_config(d_model=15))


def test_moe_from_config_builds_the_router_local_search_and_token_id_vocab():
    from xmoe.moe.config import LocalSearchConfig
    from xmoe.routing import HashRouter
    from xmoe.routing.local_search import PermutationLocalSearch

    cfg = MoEConfig(num_experts=4, d_expert=8, router="topk", router_options={"k": 2})
    moe = MoE.from_config(cfg, 16)
    assert (moe.num_experts, moe.d_expert, moe.router.k) == (4, 8, 2)
    wrapped = MoE.from_config(
        MoEConfig(num_experts=4, d_expert=8, local_search=LocalSearchConfig(0.5)), 16
    )
    assert isinstance(wrapped.router, PermutationLocalSearch)
    hashed = MoE.from_config(MoEConfig(num_experts=4, d_expert=8, router="hash"), 16, vocab_size=64)
    assert isinstance(hashed.router, HashRouter) and hashed.router.vocab_size == 64
    with pytest.raises(ValueError, match="unknown option"):
        MoE.from_config(MoEConfig(router="topk", router_options={"bogus": 1}), 16)
