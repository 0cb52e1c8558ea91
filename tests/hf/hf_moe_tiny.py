"""Tiny random Hugging Face MoE models of every supported family (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    """A 2-layer, 32-wide config of ``family`` with 8 experts."""
    T = transformers
    if family == "mixtral":
        kw = dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
        return T.MixtralConfig(**{**BASE, **kw, **overrides})
    if family == "olmoe":
        kw = dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
        return T.OlmoeConfig(**{**BASE, **kw, **overrides})
    if family == "qwen2_moe":
        kw = dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
        return T.Qwen2MoeConfig(**{**BASE, **kw, **overrides})
    if family == "qwen3_moe":
        kw = dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        )
        return T.Qwen3MoeConfig(**{**BASE, **kw, **overrides})
    if family == "deepseek_v3":
        kw = dict(
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
        return T.DeepseekV3Config(**{**BASE, **kw, **overrides})
    raise ValueError(family)


FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random causal LM; router weights large enough that tokens disagree on experts, and
    DeepSeek-V3's selection bias nonzero (so using it for the weights would be caught)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.5 if name.endswith("gate.weight") else 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return model.eval()


def token_batch(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def save_with_tokenizer(family: str, path, **overrides):
    """Save a tiny model of ``family`` with a 257-entry byte-level tokenizer (bytes + EOS) that
    ``AutoTokenizer`` loads; returns the model."""
    from transformers import PreTrainedTokenizerFast

    from xmoe.data.tokenizer import EOS, train_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(["a"], 257), eos_token=EOS)
    model = tiny_model(family, vocab_size=257, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def qwen_gpt_config(router: str = "topk", options: dict | None = None, **overrides):
    """A tiny qwen3_moe xmoe GPTConfig: 3 layers (every 2nd an MoE of 4 SwiGLU experts), d 16."""
    from xmoe.models import GPTConfig, MoEConfig

    moe = MoEConfig(
        num_experts=4,
        d_expert=8,
        router=router,
        router_options={"k": 2} if options is None else options,
        activation="swiglu",
        bias=False,
    )
    kw = dict(vocab_size=300, block_size=16, n_layer=3, n_head=2, d_model=16, d_ff=24, moe=moe)
    kw |= dict(arch="qwen3_moe", activation="swiglu", moe_every=2)
    return GPTConfig(**{**kw, **overrides})


def threshold_qwen_gpt(vocab_size: int, threshold: float):
    """A 2-layer qwen3_moe GPT, both blocks MoE with a threshold router, seed 0, eval mode."""
    from xmoe.models import GPT

    options = {"threshold": threshold, "init_std": 0.5}
    cfg = qwen_gpt_config("threshold", options, vocab_size=vocab_size, n_layer=2, moe_every=1)
    torch.manual_seed(0)
    return GPT(cfg).eval()
