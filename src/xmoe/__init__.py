"""xmoe: sparse Mixture-of-Experts for PyTorch, with XMoE's small experts and threshold router."""

from .moe.dispatch import apply_capacity, expert_capacity
from .moe.experts import Experts
from .moe.layer import MoE
from .routing import (
    Router,
    Routing,
    ThresholdRouter,
    TopKRouter,
    available_routers,
    make_router,
)

__version__ = "0.1.0"

__all__ = [
    "Experts",
    "MoE",
    "Router",
    "Routing",
    "ThresholdRouter",
    "TopKRouter",
    "apply_capacity",
    "available_routers",
    "expert_capacity",
    "make_router",
]
