"""Router registry. ``make_router(name, d_model, num_experts, **options)`` builds any router."""

from __future__ import annotations

import inspect

from .base import LinearRouter, Router, Routing
from .losses import load_balance_loss, z_loss
from .threshold import ThresholdRouter
from .topk import TopKRouter

# name -> (class, one-line description). `xmoe routers` prints this table.
ROUTERS: dict[str, tuple[type[Router], str]] = {
    "threshold": (
        ThresholdRouter,
        "XMoE: smallest set of top experts whose softmax mass reaches t (variable experts/token)",
    ),
    "topk": (
        TopKRouter,
        "top-k softmax gate (Shazeer 2017); renormalize=True is GShard/Mixtral, k=1 is Switch",
    ),
}


def available_routers() -> dict[str, str]:
    """Router names and their one-line descriptions."""
    return {name: desc for name, (_, desc) in ROUTERS.items()}


def make_router(name: str, d_model: int, num_experts: int, **options) -> Router:
    """Build the router registered as ``name``.

    Raises:
        ValueError: unknown router name, unknown option, or an option out of range.
    """
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    cls = ROUTERS[name][0]
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
    "LinearRouter",
    "Router",
    "Routing",
    "ThresholdRouter",
    "TopKRouter",
    "available_routers",
    "load_balance_loss",
    "make_router",
    "z_loss",
]
