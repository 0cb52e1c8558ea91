"""Put xmoe inside a Hugging Face MoE model: :func:`from_pretrained` and :func:`patch`.

``patch(model)`` walks the model and replaces every supported sparse MoE block (see
:data:`~xmoe.hf.block.SUPPORTED_MODELS`) by an :class:`~xmoe.hf.block.HFMoE` that holds the same
tensors. With the native routing the logits equal the HF model's (fp32: within 1e-5).
``from_pretrained`` loads with ``transformers.AutoModelForCausalLM`` (or takes a model), patches
it, and restores the routing an xmoe export recorded in the ``xmoe`` section of config.json.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .block import FAMILIES, SUPPORTED_MODELS, HFMoE, block_family, build_moe, moe_blocks
from .restore import apply_xmoe_section

__all__ = ["from_pretrained", "moe_blocks", "patch"]


def patch(model: nn.Module, *, backend: str = "auto", share: bool = True) -> list[HFMoE]:
    """Replace each supported HF sparse MoE block of ``model`` in place; returns the new blocks.

    Args:
        model: a transformers model of a supported family (any head), or one already patched.
        backend: xmoe expert backend (``"auto"``, ``"native"``, ``"segment"``, ...).
        share: the xmoe expert weights are views of HF's tensors (default, no extra memory);
            False copies them into xmoe's contiguous ``[E, d, h]`` layout (the HF tensors are
            then freed with the HF block), e.g. for kernels that want contiguous weights.

    Raises:
        ValueError: the model has no supported sparse MoE block (the message names its class,
            any MoE-looking block classes found, and the supported list).
    """
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _, _ in found):
            continue
        fam = block_family(module)
        if fam is not None:
            found.append((name, module, fam))
    done = moe_blocks(model)
    if not found and not done:
        raise ValueError(_unsupported_message(model))
    for i, (name, module, fam) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_moe(fam.name, module, len(done) + i, backend, share))
    return moe_blocks(model)


def from_pretrained(
    path_or_model: str | Path | nn.Module,
    *,
    backend: str = "auto",
    share: bool = True,
    **hf_kwargs,
):
    """A transformers causal LM with xmoe MoE blocks.

    Args:
        path_or_model: a folder (or hub name) for ``AutoModelForCausalLM.from_pretrained``, or a
            loaded model (patched in place).
        backend: xmoe expert backend.
        share: share the HF expert tensors (views) or copy them contiguous (see :func:`patch`).
        **hf_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).

    If the config has an ``xmoe`` section (written by ``xmoe export-hf`` for a threshold run),
    its routing is restored (:func:`xmoe.hf.restore.apply_xmoe_section`): the exported top-k
    (k = max experts) is only the closest thing plain transformers can run.
    """
    if isinstance(path_or_model, nn.Module):
        if hf_kwargs:
            raise ValueError(f"hf_kwargs {sorted(hf_kwargs)} apply only when loading from a path")
        model = path_or_model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path_or_model), **hf_kwargs)
    patch(model, backend=backend, share=share)
    section = getattr(model.config, "xmoe", None)
    if section:
        apply_xmoe_section(model, section)
    return model


def _unsupported_message(model: nn.Module) -> str:
    moe_like = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if any(s in type(m).__name__ for s in ("Moe", "MoE", "Sparse", "Expert"))
        }
    )
    seen = f" (MoE-like blocks found: {', '.join(moe_like)})" if moe_like else ""
    blocks = ", ".join(f"{f.model} ({f.block})" for f in FAMILIES)
    return (
        f"xmoe.hf does not support {type(model).__name__}{seen}: no supported sparse MoE block. "
        f"Supported: {blocks}. Supported model classes: {', '.join(SUPPORTED_MODELS)}"
    )
