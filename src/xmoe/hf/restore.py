"""Put the exact routing of an export's ``xmoe`` section back on a patched HF model.

:func:`restore_routing` swaps a :class:`~xmoe.routing.ThresholdRouter` into each block the
section lists as a threshold block; :func:`apply_xmoe_section` (what
``xmoe.hf.from_pretrained`` calls) then expresses it as the equal
:class:`~xmoe.routing.ScoredRouter` rule, so that ``xmoe.hf.set_routing`` and ``fit_budget``
treat it like any other rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..moe.layer import MoE
from ..routing import ThresholdRouter
from .block import require_blocks
from .section import SECTION, read_xmoe_section

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


def apply_xmoe_section(model: nn.Module, section: dict) -> None:
    """Restore the routing recorded in the ``xmoe`` section of an exported config.json.

    :func:`restore_routing` installs each threshold block's router; it is then expressed as
    the equal :class:`~xmoe.routing.ScoredRouter` rule (softmax, ``selection="threshold"``),
    so that ``routing_state``, ``set_routing`` and ``fit_budget`` treat it like any other rule.
    """
    restore_routing(model, section)
    for b in require_blocks(model):
        r = b.router
        if isinstance(r, ThresholdRouter):
            b.use_routing(
                selection="threshold",
                threshold=float(r.threshold),
                max_experts=r.max_experts,
                normalize=bool(r.renormalize),
            )
