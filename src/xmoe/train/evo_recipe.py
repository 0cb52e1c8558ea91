"""The EvoMoE recipe in the trainer: train one expert per MoE layer, then diversify.

Phase 1 (steps < ``diversify_step``): every MoE layer holds a single expert of width d_expert
(router: top-1 over one expert, so the layer is that expert). At ``diversify_step`` each layer is
replaced by the configured MoE (``model.moe``, typically router ``dts``) whose experts are masked
copies of the trained expert (:func:`xmoe.moe.evo.diversify_experts`), and the optimizer is rebuilt,
keeping the state of every parameter that survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.gpt import GPT, build_moe
from ..moe.layer import MoE
from .config import RunConfig


@dataclass
class EvoRecipe:
    diversify_step: int
    mask_ratio: float = 0.5
    noise_std: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EvoRecipe | None:
        spec = dict(cfg.model.moe.evo)
        if not spec:
            return None
        allowed = {"diversify_step", "mask_ratio", "noise_std"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"unknown model.moe.evo key(s) {unknown}; accepted: {sorted(allowed)}")
        step = spec.get("diversify_step")
        if not (isinstance(step, int) and 0 < step < cfg.train.steps):
            raise ValueError(
                f"model.moe.evo.diversify_step must be an integer in [1, train.steps), got {step!r}"
            )
        return cls(
            diversify_step=step,
            mask_ratio=float(spec.get("mask_ratio", 0.5)),
            noise_std=float(spec.get("noise_std", 0.0)),
            seed=cfg.train.seed,
        )

    def collapse(self, model: GPT) -> None:
        """Phase 1: one expert per MoE layer."""
        for block in model.blocks:
            if isinstance(block.ffn, MoE):
                single = build_moe(
                    model.cfg, num_experts=1, router="topk", router_options={"k": 1}, wrap=False
                )
                block.ffn = single
        model._init_weights()

    def diversify(self, model: GPT) -> None:
        """Phase 2: replace each single-expert layer by the configured MoE of masked copies."""
        from ..moe.evo import diversify_experts

        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoE) and block.ffn.num_experts == 1:
                new = build_moe(model.cfg)
                g = torch.Generator().manual_seed(self.seed * 7919 + i)
                new.experts = diversify_experts(
                    block.ffn.experts,
                    model.cfg.moe.num_experts,
                    mask_ratio=self.mask_ratio,
                    noise_std=self.noise_std,
                    generator=g,
                )
                block.ffn = new

    def phase2(self, step: int) -> bool:
        return step >= self.diversify_step


def build_model(cfg: RunConfig, step: int = 0) -> GPT:
    """The GPT in the shape a run has at ``step`` (EvoMoE runs change shape mid-training)."""
    model = GPT(cfg.model)
    recipe = EvoRecipe.from_config(cfg)
    if recipe is not None:
        recipe.collapse(model)
        if recipe.phase2(step):
            recipe.diversify(model)
    return model


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Copy per-parameter state (Adam moments, step) for parameters present in both."""
    live = {p for group in new.param_groups for p in group["params"]}
    for p, state in old.state.items():
        if p in live:
            new.state[p] = state
