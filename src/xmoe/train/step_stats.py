"""One training step's numbers over the global batch: losses, routing counts, router losses.

Every rank packs its step into one flat list of floats, the world takes their mean over ranks
(one small all-reduce; the identity in a single process) and :meth:`StepStats.gather` reads the
global figures back: losses are means over equal shards, experts/token and the dropped fraction
come from summed pair / token counts, the load imbalance (max / mean expert load) from the
summed expert counts, router losses and extras are means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..routing import Routing

Mean = Callable[[list[float]], list[float]]  # mean over ranks of a list of host scalars


@dataclass
class StepOutput:
    """What a task's ``loss`` returns for one batch."""

    loss: Tensor  # the scalar that is backpropagated
    # other scalars to log (lm_loss...); the first one is shown in the progress bar
    values: dict[str, Tensor] = field(default_factory=dict)
    routings: list[Routing] = field(default_factory=list)  # one per MoE layer


@dataclass
class StepStats:
    loss: float
    values: dict[str, float]
    over_time: bool  # any rank's clock is past the time limit
    experts_per_token: list[float]  # per MoE layer
    dropped_fraction: list[float]  # per MoE layer
    load_imbalance: list[float | None]  # per MoE layer: max / mean expert load (None: no pairs)
    router_losses: dict[str, float | None]  # mean over layers; None when not finite
    extras: dict[str, list[float | None]]  # per MoE layer

    @classmethod
    def gather(cls, out: StepOutput, over_time: bool, mean: Mean) -> StepStats:
        routings = out.routings
        local_losses = _router_losses(routings)
        names = sorted(local_losses)
        extra_names = sorted({k for r in routings for k in r.extras})
        value_names = list(out.values)
        packed = [out.loss.item(), float(over_time)]
        packed += [out.values[k].item() for k in value_names]
        for r in routings:
            packed += [float(r.num_pairs), float(r.num_selected or 0), float(r.num_tokens)]
        for r in routings:
            packed += [float(c) for c in r.expert_counts.tolist()]
        packed += [v if v is not None else math.nan for v in (local_losses[n] for n in names)]
        packed += [
            float(r.extras[k]) if k in r.extras else math.nan for k in extra_names for r in routings
        ]
        m = iter(mean(packed))
        loss, over = next(m), next(m)
        values = {k: next(m) for k in value_names}
        ept, dropped = [], []
        for _ in routings:
            pairs, selected, tokens = next(m), next(m), next(m)
            ept.append(pairs / max(tokens, 1e-12))
            dropped.append(0.0 if selected == 0 else 1.0 - pairs / selected)
        imbalance = []
        for r in routings:
            counts = [next(m) for _ in range(r.num_experts)]
            mean_load = sum(counts) / len(counts) if counts else 0.0
            imbalance.append(max(counts) / mean_load if mean_load > 0 else None)
        reduced = {n: next(m) for n in names}
        losses = {n: (reduced[n] if math.isfinite(reduced[n]) else None) for n in local_losses}
        extras = {}
        for k in extra_names:
            layer_values = [next(m) for _ in routings]
            extras[k] = [None if math.isnan(v) else v for v in layer_values]
        return cls(loss, values, over > 0, ept, dropped, imbalance, losses, extras)


def _router_losses(routings: list[Routing]) -> dict[str, float | None]:
    """Each named router loss, mean over MoE layers (None when not finite)."""
    totals: dict[str, float] = {}
    for r in routings:
        for name, value in r.losses.items():
            totals[name] = totals.get(name, 0.0) + value.item() / len(routings)
    return {k: (v if math.isfinite(v) else None) for k, v in totals.items()}


def mean_or_none(values: list[float]) -> float | None:
    """The mean, or None for no values (a model without MoE layers)."""
    return sum(values) / len(values) if values else None
