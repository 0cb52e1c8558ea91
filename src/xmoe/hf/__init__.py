"""Hugging Face MoE models with xmoe inside (and, in ``export``, xmoe models out).

::

    import xmoe.hf
    model = xmoe.hf.from_pretrained("path/to/mixtral-like")   # HF model, xmoe MoE blocks
    xmoe.hf.set_routing(model, "threshold", threshold=0.9)    # variable experts per token
    xmoe.hf.set_routing(model, "native")                      # the HF logits again

Supported blocks: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (``SUPPORTED_MODELS``).
"""

from __future__ import annotations

from .block import FAMILIES, SUPPORTED_MODELS, HFMoE
from .patch import from_pretrained, moe_blocks, patch
from .routing import (
    apply_xmoe_section,
    capture_inputs,
    fit_budget,
    native_k,
    replace_router,
    routing_state,
    set_routing,
)

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODELS",
    "HFMoE",
    "apply_xmoe_section",
    "capture_inputs",
    "fit_budget",
    "from_pretrained",
    "moe_blocks",
    "native_k",
    "patch",
    "replace_router",
    "routing_state",
    "set_routing",
]
