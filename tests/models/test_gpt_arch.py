"""GPTConfig.arch: the default GPT-2 blocks stay as they were; qwen3_moe builds Qwen3-MoE blocks."""

import pytest
import torch
from torch import nn

from xmoe import MoE
from xmoe.models import GPT, GPTConfig, MoEConfig
from xmoe.models.gpt import CausalSelfAttention
from xmoe.models.layers import GatedMLP, RMSNorm, RotaryAttention


def qwen_config(**overrides) -> GPTConfig:
    moe = MoEConfig(
        num_experts=4,
        d_expert=8,
        router="topk",
        router_options={"k": 2},
        activation="swiglu",
        bias=False,
    )
    cfg = GPTConfig(
        vocab_size=64,
        block_size=16,
        n_layer=3,
        n_head=2,
        d_model=16,
        d_ff=32,
        moe=moe,
        arch="qwen3_moe",
        activation="swiglu",
        moe_every=2,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_default_arch_keeps_the_gpt2_blocks_and_state_dict_names():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32)
    assert cfg.arch == "gpt" and cfg.tie_embeddings
    model = GPT(cfg)
    assert isinstance(model.ln_f, nn.LayerNorm) and isinstance(model.pos_emb, nn.Embedding)
    assert isinstance(model.blocks[0].attn, CausalSelfAttention)
    assert model.head.weight is model.tok_emb.weight
    keys = set(model.state_dict())
    assert {"pos_emb.weight", "blocks.0.attn.qkv.bias", "blocks.0.ln1.bias"} <= keys


def test_qwen3_moe_arch_builds_rmsnorm_rotary_blocks_with_moe_every_n():
    model = GPT(qwen_config())
    assert model.pos_emb is None
    assert isinstance(model.ln_f, RMSNorm)
    assert [type(b.ffn) for b in model.blocks] == [GatedMLP, MoE, GatedMLP]
    for b in model.blocks:
        assert isinstance(b.attn, RotaryAttention) and isinstance(b.ln1, RMSNorm)
        assert b.attn.qkv.bias is None and b.attn.proj.bias is None
    ex = model.blocks[1].ffn.experts
    assert ex.glu and ex.b1 is None and ex.b2 is None
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_untied_embeddings_get_their_own_head():
    model = GPT(qwen_config(tie_embeddings=False))
    assert model.head.weight is not model.tok_emb.weight
    assert "head.weight" in model.state_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "llama"}, "model.arch"),
        ({"activation": "gelu"}, "model.activation=swiglu"),
        ({"d_model": 12, "n_head": 4}, "even head width"),
        ({"rope_theta": 0.0}, "model.rope_theta"),
        ({"norm_eps": -1.0}, "model.norm_eps"),
        ({"tie_embeddings": 1}, "model.tie_embeddings"),
    ],
)
def test_bad_arch_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPT(qwen_config(**overrides))


def test_qwen3_moe_experts_must_be_swiglu_without_bias():
    cfg = qwen_config()
    cfg.moe.bias = True
    with pytest.raises(ValueError, match="model.moe.bias=false"):
        GPT(cfg)
    cfg = qwen_config(moe_every=1)
    cfg.moe.activation = "gelu"
    with pytest.raises(ValueError, match="model.moe.activation=swiglu"):
        GPT(cfg)
    # no MoE block: the expert settings do not matter; no dense block: the FFN activation
    GPT(qwen_config(moe_every=0, moe=MoEConfig(num_experts=4, d_expert=8)))
    GPT(qwen_config(moe_every=1, activation="gelu"))


def test_qwen3_moe_trains_forward_and_backward():
    torch.manual_seed(0)
    model = GPT(qwen_config())
    idx = torch.randint(0, 64, (2, 16))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, 64) and len(out.routings) == 1
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_qwen3_moe_kv_cache_logits_equal_the_full_forward():
    torch.manual_seed(0)
    model = GPT(qwen_config()).eval()
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx).logits
    cache = model.new_cache(2)
    parts = [model(idx[:, :5], cache=cache).logits]
    for t in range(5, 12):
        parts.append(model(idx[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_qwen3_moe_generate_with_and_without_cache_agree():
    torch.manual_seed(0)
    model = GPT(qwen_config()).eval()
    prompt = torch.randint(0, 64, (1, 3))
    torch.manual_seed(1)
    cached = model.generate(prompt, 10, top_k=1)
    torch.manual_seed(1)
    plain = model.generate(prompt, 10, top_k=1, use_cache=False)
    assert torch.equal(cached, plain) and cached.shape == (1, 13)
    # past block_size the cached path slides the window (and keeps going)
    assert model.generate(prompt, 30, top_k=5).shape == (1, 33)


def test_qwen3_moe_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(qwen_config()).eval()
    idx = torch.randint(0, 64, (2, 16))
    ref = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2
