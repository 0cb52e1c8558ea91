"""The EvoMoE recipe in training: train one expert per MoE layer, then diversify.

Phase 1 (steps < ``diversify_step``): every MoE layer holds a single expert of width d_expert
(router: top-1 over one expert, so the layer is that expert). At ``diversify_step`` each layer is
replaced by the configured MoE (``model.moe``, typically router ``dts``) whose experts are masked
copies of the trained expert (:func:`xmoe.moe.evo.diversify_experts`); the training loop then
rebuilds the optimizer, keeping the state of every parameter that survives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.gpt import GPT, build_moe
from ..moe.config import EvoConfig
from ..moe.evo import diversify_experts
from ..moe.layer import MoE


@dataclass
class EvoRecipe:
    """``config`` (``model.moe.evo``) applied to a GPT; ``seed`` draws the masks."""

    config: EvoConfig
    seed: int = 0

    @property
    def diversify_step(self) -> int:
        return self.config.diversify_step

    def collapse(self, model: GPT) -> None:
        """Phase 1: one expert per MoE layer."""
        single = replace(
            model.cfg.moe, num_experts=1, router="topk", router_options={"k": 1}, local_search=None
        )
        for block in model.blocks:
            if isinstance(block.ffn, MoE):
                block.ffn = build_moe(model.cfg, single)
        model.init_weights()

    def diversify(self, model: GPT) -> None:
        """Phase 2: replace each single-expert layer by the configured MoE of masked copies."""
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoE) and block.ffn.num_experts == 1:
                new = build_moe(model.cfg)
                g = torch.Generator().manual_seed(self.seed * 7919 + i)
                new.experts = diversify_experts(
                    block.ffn.experts,
                    model.cfg.moe.num_experts,
                    mask_ratio=self.config.mask_ratio,
                    noise_std=self.config.noise_std,
                    generator=g,
                )
                block.ffn = new

    def phase2(self, step: int) -> bool:
        return step >= self.diversify_step
