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

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer
from torch import Tensor

from .._io import atomic_write
from ..data.tokenizer import EOS
from ..models.gpt import GPT
from .checkpoint import (
    HF_ARCHITECTURE,
    HF_MODEL_TYPE,
    check_exportable,
    hf_config,
    hf_state_dict,
    json_text,
    tokenizer_files,
)
from .restore import restore_routing
from .section import SECTION, SECTION_FORMAT, layer_routing, read_xmoe_section, xmoe_section

__all__ = [
    "HF_ARCHITECTURE",
    "HF_MODEL_TYPE",
    "SECTION",
    "SECTION_FORMAT",
    "check_exportable",
    "compare_logits",
    "export_model",
    "hf_config",
    "hf_state_dict",
    "layer_routing",
    "read_xmoe_section",
    "restore_routing",
    "tokenizer_files",
    "xmoe_section",
]


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
    files: dict[str, str | bytes] = {"config.json": json_text(hf_config(model, eos_id))}
    files["model.safetensors"] = safetensors_bytes(hf_state_dict(model), {"format": "pt"})
    files["generation_config.json"] = json_text(
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
