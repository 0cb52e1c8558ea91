"""The qwen3_moe building blocks: RMSNorm, rotary positions, q/k-norm attention, SwiGLU MLP.

Each is checked against a hand-written formula, and, where transformers is installed, against
the Qwen3-MoE module it stands in for (copied weights).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from xmoe.models.kv_cache import KVCache
from xmoe.models.layers import GatedMLP, RMSNorm, Rotary, RotaryAttention, causal_attention


def test_rmsnorm_matches_the_hand_formula_in_fp32_and_casts_before_the_weight():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6) * 4
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.weight, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    expected = (
        norm.weight
        * (xb.float() / xb.float().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).bfloat16()
    )
    torch.testing.assert_close(norm(xb), expected)


def test_rotary_rotates_pairs_half_a_head_apart_by_position_times_frequency():
    rot = Rotary(4, theta=100.0)
    x = torch.randn(1, 1, 3, 4)
    cos, sin = rot.cos_sin(torch.arange(3), torch.float32)
    y = Rotary.rotate(x, cos, sin)
    for p in range(3):
        for i, freq in enumerate((1.0, 100.0 ** (-2 / 4))):
            a, b = x[0, 0, p, i].item(), x[0, 0, p, i + 2].item()
            angle = p * freq
            assert y[0, 0, p, i].item() == pytest.approx(
                a * math.cos(angle) - b * math.sin(angle), abs=1e-6
            )
            assert y[0, 0, p, i + 2].item() == pytest.approx(
                b * math.cos(angle) + a * math.sin(angle), abs=1e-6
            )


def test_rotary_scores_depend_only_on_the_offset():
    rot = Rotary(8)
    q, k = torch.randn(8), torch.randn(8)

    def score(pq: int, pk: int) -> float:
        cq, sq = rot.cos_sin(torch.tensor([pq]), torch.float32)
        ck, sk = rot.cos_sin(torch.tensor([pk]), torch.float32)
        return float((Rotary.rotate(q, cq, sq) * Rotary.rotate(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rotary_rejects_an_odd_head_width():
    with pytest.raises(ValueError, match="head_dim"):
        Rotary(5)


def test_gated_mlp_is_silu_gate_times_up_then_down():
    mlp = GatedMLP(4, 6)
    x = torch.randn(2, 4)
    expected = (F.silu(x @ mlp.fc.weight.T) * (x @ mlp.up.weight.T)) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert all(m.bias is None for m in (mlp.fc, mlp.up, mlp.proj))


def _attention_oracle(attn: RotaryAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head loop: q/k RMSNorm, rotation, causal softmax(q k^T / sqrt(hd)) v."""
    B, T, C = x.shape
    H, hd = attn.n_head, attn.head_dim
    qkv = x @ attn.qkv.weight.T
    out = torch.zeros(B, T, C)
    cos, sin = attn.rotary.cos_sin(torch.arange(T), torch.float32)
    for h in range(H):
        q = qkv[..., h * hd : (h + 1) * hd]
        k = qkv[..., C + h * hd : C + (h + 1) * hd]
        v = qkv[..., 2 * C + h * hd : 2 * C + (h + 1) * hd]
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out[..., h * hd : (h + 1) * hd] = scores.softmax(-1) @ v
    return out @ attn.proj.weight.T


def test_rotary_attention_matches_a_per_head_loop_and_the_kv_cache():
    torch.manual_seed(0)
    attn = RotaryAttention(16, 2, rope_theta=500.0)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 16)
    full = attn(x)
    torch.testing.assert_close(full, _attention_oracle(attn, x), rtol=1e-5, atol=1e-5)
    cache = KVCache.empty(1, 2, 2, 8, 8, torch.float32, torch.device("cpu"))
    first = attn(x[:, :4], cache)
    cache.advance(4)
    rest = attn(x[:, 4:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_causal_attention_with_a_cache_equals_the_full_causal_attention():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    full = causal_attention(q, k, v, None, 0, 0.0)
    cache = KVCache.empty(1, 1, 2, 5, 4, torch.float32, torch.device("cpu"))
    a = causal_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], cache, 0, 0.0)
    cache.advance(3)
    b = causal_attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], cache, 0, 0.0)
    torch.testing.assert_close(torch.cat([a, b], 2), full)


def test_blocks_equal_their_transformers_qwen3_moe_counterparts():
    qwen = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    from transformers import Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=24,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        max_position_embeddings=32,
    )
    cfg._attn_implementation = "sdpa"
    x = torch.randn(2, 9, 16)

    ours_norm, theirs_norm = RMSNorm(16, 1e-6), qwen.Qwen3MoeRMSNorm(16, 1e-6)
    with torch.no_grad():
        theirs_norm.weight.uniform_(0.5, 1.5)
        ours_norm.weight.copy_(theirs_norm.weight)
    torch.testing.assert_close(ours_norm(x), theirs_norm(x), rtol=0, atol=0)

    mlp = GatedMLP(16, 24)
    hf_mlp = qwen.Qwen3MoeMLP(cfg)
    hf_mlp.load_state_dict(
        {
            "gate_proj.weight": mlp.fc.weight,
            "up_proj.weight": mlp.up.weight,
            "down_proj.weight": mlp.proj.weight,
        }
    )
    torch.testing.assert_close(mlp(x), hf_mlp(x), rtol=1e-6, atol=1e-6)

    attn = RotaryAttention(16, 2, rope_theta=1000.0)
    hf_attn = qwen.Qwen3MoeAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    q, k, v = attn.qkv.weight.split(16)
    hf_attn.load_state_dict(
        {
            "q_proj.weight": q,
            "k_proj.weight": k,
            "v_proj.weight": v,
            "o_proj.weight": attn.proj.weight,
            "q_norm.weight": attn.q_norm.weight,
            "k_norm.weight": attn.k_norm.weight,
        }
    )
    positions = torch.arange(9)[None]
    cos, sin = qwen.Qwen3MoeRotaryEmbedding(cfg)(x, positions)
    ours_cos, ours_sin = attn.rotary.cos_sin(torch.arange(9), torch.float32)
    torch.testing.assert_close(ours_cos, cos[0], rtol=0, atol=0)
    torch.testing.assert_close(ours_sin, sin[0], rtol=0, atol=0)
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    theirs, _ = hf_attn(x, (cos, sin), attention_mask=mask)
    torch.testing.assert_close(attn(x), theirs, rtol=1e-5, atol=1e-5)
