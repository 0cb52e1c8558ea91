"""Export of xmoe GPTs to Hugging Face Qwen3-MoE checkpoints that transformers loads as they are.

A GPT with ``arch: qwen3_moe`` computes what ``transformers``' ``Qwen3MoeForCausalLM``
computes. :func:`export_model` writes that model as a Qwen3-MoE folder:

- ``config.json``: a ``qwen3_moe`` config, plus an ``xmoe`` section (:func:`xmoe_section`);
- ``model.safetensors``: fp32 weights, experts in the per-expert layout of Qwen3 checkpoints
  (``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``);
- ``tokenizer.json`` + ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``) and
  ``generation_config.json``.

How each router exports (all MoE layers share one HF config, so they must agree):

===========================  =========================================  =====================
xmoe router                  Qwen3-MoE routing                          exact under transformers
===========================  =========================================  =====================
``topk`` (k, renormalize)    ``num_experts_per_tok=k``,                 yes
                             ``norm_topk_prob=renormalize``
``switch`` / ``gshard``      k = 1 / 2 (their eval routing)             yes
``noisy_topk``               k, ``norm_topk_prob=true`` (eval gates)    yes
``threshold``                top-k with k = ``max_experts`` (or E),     no: the ``xmoe``
                             ``norm_topk_prob=renormalize``             section holds it
===========================  =========================================  =====================

A threshold run is therefore *not* reproduced by plain transformers: it runs the top-k router
with k = the most experts the threshold router may keep. The exact threshold routing (t per
layer, ``max_experts``, ``renormalize``) is in ``config.json["xmoe"]``, and
:func:`restore_routing` puts it back on a model whose sparse blocks are xmoe :class:`MoE`
layers (what ``xmoe.hf.from_pretrained`` builds). Shared experts, null experts, loss-free
balancing biases, eval capacity factors and the other routers have no Qwen3-MoE equivalent:
they are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer
from torch import Tensor, nn

from .._io import atomic_write
from ..data.tokenizer import EOS
from ..models.gpt import GPT
from ..moe.layer import MoE
from ..routing import NoisyTopKRouter, ThresholdRouter, TopKRouter
from ..routing.selection import PreferenceRouter

SECTION = "xmoe"  # the key of the xmoe section in config.json
SECTION_FORMAT = 1
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
HF_MODEL_TYPE = "qwen3_moe"


# --- routing -------------------------------------------------------------------------------


def layer_routing(moe: MoE, layer: int) -> dict:
    """How block ``layer``'s MoE exports: ``{"k", "norm_topk_prob", "exact", "router",
    "options"}`` where ``options`` are the exact xmoe routing's settings.

    Raises:
        ValueError: the router (or its capacity, null experts, balancing bias) has no
            Qwen3-MoE equivalent.
    """
    where = f"block {layer}"
    r = moe.router
    if moe.eval_capacity_factor is not None:
        raise ValueError(
            f"{where}: eval_capacity_factor={moe.eval_capacity_factor} drops tokens at eval; "
            "Qwen3-MoE is dropless. Export a run with model.moe.eval_capacity_factor=null"
        )
    if getattr(moe, "shared_experts", None) is not None:
        raise ValueError(
            f"{where}: the MoE has shared experts, which Qwen3-MoE has no equivalent for "
            "(Qwen2-MoE and DeepSeek-V3 have them); export a run with model.moe.shared_experts=0"
        )
    if isinstance(r, PreferenceRouter):
        if r.num_null_experts:
            raise ValueError(
                f"{where}: the router has {r.num_null_experts} null experts, which Qwen3-MoE "
                "has no equivalent for; export a run without num_null_experts"
            )
        if r.loss_free_balance:
            raise ValueError(
                f"{where}: the router ranks experts with a loss-free balancing bias, which "
                "Qwen3-MoE has no equivalent for; export a run without loss_free_balance"
            )
    if isinstance(r, ThresholdRouter):
        k = r.max_experts or r.num_experts
        options = {
            "threshold": float(r.budget.threshold if r.budget is not None else r.threshold),
            "max_experts": r.max_experts,
            "renormalize": r.renormalize,
        }
        return _plan("threshold", options, k, r.renormalize, exact=False)
    if isinstance(r, TopKRouter):  # topk, switch, gshard: eval routing is top-k
        options = {"k": r.k, "renormalize": r.renormalize}
        return _plan("topk", options, r.k, r.renormalize, exact=True)
    if isinstance(r, NoisyTopKRouter):  # eval: softmax over the top-k logits
        return _plan("topk", {"k": r.k, "renormalize": True}, r.k, True, exact=True)
    raise ValueError(
        f"{where}: router {type(r).__name__} has no Qwen3-MoE equivalent; export-hf takes "
        "topk, switch, gshard, noisy_topk (exactly) and threshold (as top-k + xmoe section)"
    )


def _plan(router: str, options: dict, k: int, norm: bool, *, exact: bool) -> dict:
    return {"router": router, "options": options, "k": k, "norm_topk_prob": norm, "exact": exact}


def xmoe_section(model: GPT) -> dict:
    """The ``xmoe`` section of ``config.json``: the exact routing of every MoE block.

    ``{"format": 1, "exact": bool, "exported_as": {"router": "topk", "k", "norm_topk_prob"},
    "layers": {"<block index>": {"router": "topk" | "threshold", "options": {...}}},
    "model": the xmoe GPTConfig as a dict}``. ``exact`` is true when plain transformers
    computes the xmoe routing itself (every block is top-k).
    """
    plans = {
        i: layer_routing(b.ffn, i) for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)
    }
    shared = {(p["k"], p["norm_topk_prob"]) for p in plans.values()}
    if len(shared) > 1:
        raise ValueError(
            "the MoE blocks export to different (k, norm_topk_prob) pairs "
            f"{sorted(shared)}, but a Qwen3-MoE config holds one for all layers"
        )
    if plans:
        k, norm = shared.pop()
    else:  # no MoE block: the HF config still needs valid expert settings
        k, norm = min(2, model.cfg.moe.num_experts), False
    return {
        "format": SECTION_FORMAT,
        "exact": all(p["exact"] for p in plans.values()),
        "exported_as": {"router": "topk", "k": k, "norm_topk_prob": norm},
        "layers": {
            str(i): {"router": p["router"], "options": p["options"]} for i, p in plans.items()
        },
        "model": model.cfg.to_dict(),
    }


# --- config and weights --------------------------------------------------------------------


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
    return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": _json(config)}


# --- writing -------------------------------------------------------------------------------


def export_model(
    model: GPT,
    out: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Qwen3-MoE folder at ``out``; returns it.

    The folder is written next to ``out`` and renamed into place, so ``out`` is the complete
    old export or the complete new one, never a mix. An existing ``out`` is replaced only
    with ``overwrite`` and only if it is empty or an earlier export (holds ``config.json``).

    Raises:
        ValueError: the model cannot be expressed as Qwen3-MoE (see :func:`layer_routing`), the
            tokenizer has more tokens than the model's vocabulary, or ``out`` exists.
    """
    out = Path(out)
    if tokenizer is not None and tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is only "
            f"{model.cfg.vocab_size}"
        )
    _check_target(out, overwrite)
    eos_id = tokenizer.token_to_id(EOS) if tokenizer is not None else None
    files: dict[str, str | bytes] = {"config.json": _json(hf_config(model, eos_id))}
    files["model.safetensors"] = safetensors_bytes(hf_state_dict(model), {"format": "pt"})
    files["generation_config.json"] = _json(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "bos_token_id": None}
    )
    if tokenizer is not None:
        files |= tokenizer_files(tokenizer, model.cfg.block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it")
    if not (out / "config.json").exists():
        raise ValueError(
            f"--out {str(out)!r} holds files but no config.json (not an export); refusing to "
            "replace it"
        )


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


# --- restoring the exact routing -----------------------------------------------------------


def read_xmoe_section(source: str | Path | Mapping | object) -> dict | None:
    """The ``xmoe`` section from an export folder, a ``config.json`` dict, or a transformers
    config object (``model.config``); None when there is none."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        source = json.loads(path.read_text())
    get = source.get if isinstance(source, Mapping) else lambda key: getattr(source, key, None)
    section = get(SECTION)
    if section is None:
        return None
    if not isinstance(section, Mapping) or section.get("format") != SECTION_FORMAT:
        raise ValueError(
            f"config.json['{SECTION}'] is not an xmoe section of format {SECTION_FORMAT}: "
            f"{section!r:.200}"
        )
    return dict(section)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def restore_routing(hf_model: nn.Module, xmoe_section: Mapping) -> dict[int, MoE]:
    """Put the exact xmoe routing of ``xmoe_section`` back on ``hf_model``.

    Contract (what ``xmoe.hf.from_pretrained`` relies on):

    - ``hf_model`` is the loaded model *after* its sparse blocks were replaced by xmoe
      :class:`MoE` layers: each ``MoE`` sits anywhere below ``...layers.<i>`` (for Qwen3-MoE
      ``model.layers.<i>.mlp``), one per sparse block, with ``router.weight: [E, d_model]``
      holding the HF gate's weight.
    - For every block listed in ``xmoe_section["layers"]`` whose router is ``"threshold"``,
      the MoE's router is replaced by a :class:`~xmoe.routing.ThresholdRouter` with the
      section's ``threshold``, ``max_experts`` and ``renormalize`` and the same weight (the
      tensor is shared, not copied). Its logits then equal those of the xmoe model exported.
    - ``"topk"`` blocks are left as they are (their native routing is already exact).
    - The experts, and every other module, are untouched; a later ``restore_native()`` /
      ``xmoe.hf.set_routing(model, "native")`` brings back the exported top-k.
    - The section may be passed as read by :func:`read_xmoe_section` (or ``config.xmoe``).

    Returns the MoE layers it changed, by block index.

    Raises:
        ValueError: a listed block has no MoE, the section is malformed, or its expert count
            differs from the MoE's.
    """
    section = read_xmoe_section({SECTION: xmoe_section})
    moes: dict[int, MoE] = {}
    for name, module in hf_model.named_modules():
        match = _LAYER.search(name)
        if isinstance(module, MoE) and match:
            moes.setdefault(int(match.group(1)), module)
    changed: dict[int, MoE] = {}
    for key, entry in section.get("layers", {}).items():
        layer = int(key)
        if entry.get("router") != "threshold":
            continue
        if layer not in moes:
            raise ValueError(
                f"xmoe section lists block {layer} but the model has no xmoe MoE under "
                f"layers.{layer} (replace the sparse blocks first, e.g. xmoe.hf.from_pretrained)"
            )
        moe = moes[layer]
        options = entry.get("options", {})
        weight = moe.router.weight
        if weight.shape[0] != moe.num_experts:
            raise ValueError(
                f"block {layer}: router weight has {weight.shape[0]} rows, expected "
                f"{moe.num_experts} experts"
            )
        with torch.device("meta"):  # its weight is the block's own, set below
            router = ThresholdRouter(
                moe.d_model,
                moe.num_experts,
                threshold=float(options["threshold"]),
                max_experts=options.get("max_experts"),
                renormalize=bool(options.get("renormalize", False)),
            )
        if isinstance(weight, nn.Parameter):
            router.weight = weight
        else:
            router.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        router.train(moe.training)
        moe.router = router
        changed[layer] = moe
    return changed


# --- checking an export --------------------------------------------------------------------


@torch.no_grad()
def compare_logits(model: GPT, out: str | Path, idx: Tensor) -> dict:
    """Load the export at ``out`` with plain ``transformers.AutoModelForCausalLM`` and compare
    its logits with ``model``'s on ``idx: [B, T]`` (both fp32, eval mode).

    Returns ``{"max_abs_diff", "max_abs_logit", "exact_routing"}``; ``exact_routing`` is the
    section's ``exact`` (False: transformers runs top-k where xmoe ran the threshold router,
    so the logits are expected to differ). Needs ``transformers``.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    was_training = model.training
    model.eval()
    try:
        ours = model(idx).logits.float()
    finally:
        model.train(was_training)
    theirs = hf(input_ids=idx).logits.float()
    section = read_xmoe_section(out) or {}
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_abs_logit": float(ours.abs().max()),
        "exact_routing": bool(section.get("exact", True)),
    }
