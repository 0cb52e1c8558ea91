"""A qwen3_moe GPT as Qwen3-MoE checkpoint contents: ``config.json``, weights, tokenizer files.

:func:`hf_config` is the ``qwen3_moe`` config (with the ``xmoe`` section), :func:`hf_state_dict`
the weights under Qwen3-MoE names (experts per expert, as Qwen3 checkpoints store them), and
:func:`tokenizer_files` a ``PreTrainedTokenizerFast`` that encodes as the run's tokenizer.
:func:`check_exportable` refuses what has no exact Qwen3-MoE counterpart.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..data.tokenizer import EOS
from ..moe.layer import MoE
from .section import SECTION, xmoe_section

if TYPE_CHECKING:
    from ..models.gpt import GPT

HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
HF_MODEL_TYPE = "qwen3_moe"


def check_exportable(model: GPT) -> None:
    """Raise ``ValueError`` unless ``model`` has an exact Qwen3-MoE counterpart."""
    cfg = model.cfg
    if cfg.arch != "qwen3_moe":
        raise ValueError(
            f"model.arch={cfg.arch!r} (GPT-2 blocks: LayerNorm, learned positions, biases) "
            "matches no Hugging Face MoE family; train with model.arch=qwen3_moe "
            "(e.g. configs/demo-qwen3moe.yaml) to export"
        )
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoE):
            ex = block.ffn.experts
            if not ex.glu or ex.act.builtin != "silu" or ex.b1 is not None or ex.b2 is not None:
                raise ValueError(f"block {i}: experts must be SwiGLU without bias to export")


def hf_config(model: GPT, eos_token_id: int | None = None) -> dict:
    """The ``config.json`` of ``model`` as a ``qwen3_moe`` model (with the ``xmoe`` section)."""
    check_exportable(model)
    cfg = model.cfg
    section = xmoe_section(model)
    dense = [i for i, b in enumerate(model.blocks) if not isinstance(b.ffn, MoE)]
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.d_model // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        # Block i is sparse iff i is not listed here: the list says it for every layer.
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
        "moe_intermediate_size": cfg.moe.d_expert,
        "num_experts": cfg.moe.num_experts,
        "num_experts_per_tok": section["exported_as"]["k"],
        "norm_topk_prob": section["exported_as"]["norm_topk_prob"],
        "output_router_logits": False,
        "router_aux_loss_coef": float(model.loss_coefs().get("load_balance", 0.0)),
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": "float32",
        SECTION: section,
    }


def hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """``model``'s weights under Qwen3-MoE names (fp32, contiguous, no shared storage)."""
    check_exportable(model)
    C = model.cfg.d_model
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        attn = block.attn
        q, k, v = attn.qkv.weight.split(C, dim=0)
        out |= {
            p + "input_layernorm.weight": block.ln1.weight,
            p + "post_attention_layernorm.weight": block.ln2.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": attn.proj.weight,
            p + "self_attn.q_norm.weight": attn.q_norm.weight,
            p + "self_attn.k_norm.weight": attn.k_norm.weight,
        }
        if isinstance(block.ffn, MoE):
            ex = block.ffn.experts
            out[p + "mlp.gate.weight"] = block.ffn.router.weight
            for e in range(ex.num_experts):  # xmoe stores [in, out]; nn.Linear is [out, in]
                q_e = f"{p}mlp.experts.{e}."
                out[q_e + "gate_proj.weight"] = ex.w1[e].T
                out[q_e + "up_proj.weight"] = ex.w3[e].T
                out[q_e + "down_proj.weight"] = ex.w2[e].T
        else:
            out[p + "mlp.gate_proj.weight"] = block.ffn.fc.weight
            out[p + "mlp.up_proj.weight"] = block.ffn.up.weight
            out[p + "mlp.down_proj.weight"] = block.ffn.proj.weight
    out["model.norm.weight"] = model.ln_f.weight
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    return {name: t.detach().to(torch.float32).contiguous().clone() for name, t in out.items()}


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` that ``AutoTokenizer`` loads as a
    ``PreTrainedTokenizerFast`` encoding exactly as ``tokenizer`` does."""
    eos = EOS if tokenizer.token_to_id(EOS) is not None else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": eos,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json_text(config)}


def json_text(obj: dict) -> str:
    """``obj`` as the indented JSON text of a config file."""
    return json.dumps(obj, indent=2) + "\n"
