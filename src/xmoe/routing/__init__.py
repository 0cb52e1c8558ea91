"""Router registry. ``make_router(name, d_model, num_experts, **options)`` builds any router."""

from __future__ import annotations

import inspect

from .balanced import BalancedAssignmentRouter
from .base import LinearRouter, Router, Routing
from .comet import CometRouter
from .dselect import DSelectKRouter
from .dts import DenseToSparseRouter
from .expert_choice import ExpertChoiceRouter
from .hash import HashRouter
from .losses import cv_squared, entropy_loss, load_balance_loss, threshold_soft_count, z_loss
from .noisy import NoisyTopKRouter
from .scored import ScoredRouter
from .selection import PreferenceRouter
from .threshold import ThresholdRouter
from .topk import GShardRouter, SwitchRouter, TopKRouter

# name -> (class, one-line description). `xmoe routers` prints this table.
ROUTERS: dict[str, tuple[type[Router], str]] = {
    "threshold": (
        ThresholdRouter,
        "XMoE: smallest set of top experts whose softmax mass reaches t (variable experts/token)",
    ),
    "topk": (
        TopKRouter,
        "top-k softmax gate; options k, renormalize, noisy, null experts, loss-free balancing",
    ),
    "switch": (
        SwitchRouter,
        "Switch Transformer: top-1, capacity factor 1.25 in training, scaled-down router init",
    ),
    "gshard": (
        GShardRouter,
        "GShard: top-2 renormalised over the pair, random routing of the 2nd expert in training",
    ),
    "noisy_topk": (
        NoisyTopKRouter,
        "Shazeer 2017: learned-noise top-k with importance and smooth load (normal CDF) losses",
    ),
    "expert_choice": (
        ExpertChoiceRouter,
        "Expert Choice: each expert takes its top c*N/E tokens (0..E experts per token)",
    ),
    "hash": (
        HashRouter,
        "Hash layers: fixed token-id -> expert table (random or frequency balanced), unlearned",
    ),
    "base": (
        BalancedAssignmentRouter,
        "BASE layers: balanced linear assignment in training, greedy top-1 at eval, sigmoid gate",
    ),
    "dselect_k": (
        DSelectKRouter,
        "DSelect-k: k smooth-step binary selectors, softmax-mixed; exactly sparse once binary",
    ),
    "comet": (
        CometRouter,
        "COMET: k soft binary trees (smooth-step nodes), one softmax over all leaves",
    ),
    "dts": (
        DenseToSparseRouter,
        "EvoMoE dense-to-sparse: Gumbel-softmax with annealed temperature, drop G < 1e-3",
    ),
    "scored": (
        ScoredRouter,
        "HF families: softmax|sigmoid scores, selection bias, groups; topk|threshold|entropy_k",
    ),
}


def available_routers() -> dict[str, str]:
    """Router names and their one-line descriptions."""
    return {name: desc for name, (_, desc) in ROUTERS.items()}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    return ROUTERS[name][0]


def make_router(name: str, d_model: int, num_experts: int, **options) -> Router:
    """Build the router registered as ``name``.

    Raises:
        ValueError: unknown router name, unknown option, or an option out of range.
    """
    cls = router_class(name)
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for router {name!r}; accepted: {sorted(accepted)}"
        )
    return cls(d_model, num_experts, **options)


def _accepted_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Router, object) or not issubclass(klass, Router):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                names.add(p.name)
    return names


__all__ = [
    "ROUTERS",
    "BalancedAssignmentRouter",
    "CometRouter",
    "DSelectKRouter",
    "DenseToSparseRouter",
    "ExpertChoiceRouter",
    "GShardRouter",
    "HashRouter",
    "LinearRouter",
    "NoisyTopKRouter",
    "PreferenceRouter",
    "Router",
    "Routing",
    "ScoredRouter",
    "SwitchRouter",
    "ThresholdRouter",
    "TopKRouter",
    "available_routers",
    "cv_squared",
    "entropy_loss",
    "load_balance_loss",
    "make_router",
    "router_class",
    "threshold_soft_count",
    "z_loss",
]
