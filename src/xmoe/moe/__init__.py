"""The MoE layer and what it runs on: dispatch, stacked experts, kernels, EvoMoE surgery."""

from .config import MoEConfig
from .dispatch import (
    DispatchPlan,
    apply_capacity,
    expert_capacity,
    permute,
    plan_dispatch,
    unpermute,
)
from .experts import Experts
from .layer import MoE

__all__ = [
    "DispatchPlan",
    "Experts",
    "MoE",
    "MoEConfig",
    "apply_capacity",
    "expert_capacity",
    "permute",
    "plan_dispatch",
    "unpermute",
]
