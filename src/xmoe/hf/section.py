"""The ``xmoe`` section of an export's config.json: how each MoE block's routing exports.

All MoE layers share one Qwen3-MoE config, so they must export to the same ``(k,
norm_topk_prob)``. :func:`layer_routing` plans one block, :func:`xmoe_section` writes the
section for a whole GPT, :func:`read_xmoe_section` reads it back (from a folder, a dict, or a
transformers config). The table of what exports exactly is in :mod:`xmoe.hf.export`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..moe.layer import MoE
from ..routing import NoisyTopKRouter, ThresholdRouter, TopKRouter
from ..routing.selection import PreferenceRouter

if TYPE_CHECKING:
    from ..models.gpt import GPT

SECTION = "xmoe"  # the key of the xmoe section in config.json
SECTION_FORMAT = 1


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
