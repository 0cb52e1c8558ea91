"""Turn a model built identically on every rank into its data/expert-parallel form, in place."""

from __future__ import annotations

from torch import nn

from ..moe.layer import MoE
from .ep_layer import ExpertParallelMoE, use_global_router_stats
from .groups import ParallelContext


def parallelize_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Prepare ``model`` (e.g. a :class:`~xmoe.models.GPT`) for ``ctx``'s layout, in place.

    Build the model from the same seed on every rank first (identical weights everywhere).
    Then every MoE layer's routers report global-batch statistics (world group), and with
    expert parallelism (P > 1) every MoE layer is swapped for an :class:`ExpertParallelMoE`
    holding this rank's slice of its experts (weights copied). Idempotent; returns ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, MoE):
                continue
            use_global_router_stats(child.router, ctx.world_group)
            if ctx.expert_parallel > 1 and not isinstance(child, ExpertParallelMoE):
                setattr(
                    parent,
                    name,
                    ExpertParallelMoE(child, ctx.ep_group, ctx.expert_parallel, ctx.ep_rank),
                )
    return model


def expert_parameters(model: nn.Module) -> dict[nn.Parameter, ExpertParallelMoE]:
    """Sharded (expert-parallel) parameters → the layer that holds them."""
    out = {}
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            for p in module.experts.parameters():
                out[p] = module
    return out


def global_num_params(model: nn.Module, ctx: ParallelContext | None) -> dict[str, int]:
    """``{"total", "expert", "non_expert"}`` of the whole (unsharded) model."""
    sharded = expert_parameters(model)
    total = expert = 0
    for module in model.modules():
        if isinstance(module, MoE):
            scale = ctx.expert_parallel if isinstance(module, ExpertParallelMoE) and ctx else 1
            expert += scale * sum(p.numel() for p in module.experts.parameters())
    local_total = sum(p.numel() for p in model.parameters())
    local_sharded = sum(p.numel() for p in sharded)
    scale = ctx.expert_parallel if ctx else 1
    total = local_total - local_sharded + scale * local_sharded
    return {"total": total, "expert": expert, "non_expert": total - expert}
