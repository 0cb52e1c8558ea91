"""Accuracy, calibration (ECE and the reliability diagram's bins) and split-conformal sets.

- ECE: ``bins`` equal-width confidence bins of the max probability; the weighted mean of
  ``|accuracy - confidence|`` over the bins.
- Split conformal (the LAC score ``1 - p_y``): the calibration quantile is the
  ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the calibration scores; a test set
  holds every class with ``1 - p_c <= q``. Under exchangeability its coverage is ``>= 1 - alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int, check_range


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(-1) == labels).float().mean().item()


@dataclass
class Reliability:
    edges: list[float]  # bins + 1 edges on [0, 1]
    confidence: list[float | None]  # mean confidence per bin (None: empty bin)
    accuracy: list[float | None]
    count: list[int]
    ece: float


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> Reliability:
    """Per-bin confidence and accuracy of the max probability, and the ECE."""
    check_int("bins", bins, 1)
    conf, pred = probs.float().max(-1)
    correct = (pred == labels).float()
    idx = (conf * bins).long().clamp(max=bins - 1)
    mean_conf, mean_acc, counts = [], [], []
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        counts.append(n)
        if n == 0:
            mean_conf.append(None)
            mean_acc.append(None)
            continue
        c, a = conf[sel].mean().item(), correct[sel].mean().item()
        mean_conf.append(c)
        mean_acc.append(a)
        ece += n / len(labels) * abs(a - c)
    edges = [b / bins for b in range(bins + 1)]
    return Reliability(edges, mean_conf, mean_acc, counts, ece)


def conformal_quantile(probs: Tensor, labels: Tensor, alpha: float = 0.1) -> float:
    """The split-conformal threshold ``q`` on the scores ``1 - p_y`` of the calibration set."""
    check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    n = len(labels)
    if n == 0:
        raise ValueError("conformal calibration needs at least one example")
    scores = 1.0 - probs.float()[torch.arange(n), labels]
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return 1.0  # too few calibration points for this alpha: every class is in the set
    return scores.sort().values[k - 1].item()


def conformal_sets(probs: Tensor, q: float) -> Tensor:
    """``[N, C]`` bool: class c is in the set of input n iff ``1 - p_nc <= q``."""
    return (1.0 - probs.float()) <= q


def conformal_summary(sets: Tensor, labels: Tensor) -> dict:
    """Mean set size and empirical coverage."""
    covered = sets[torch.arange(len(labels)), labels]
    return {
        "set_size": sets.float().sum(1).mean().item(),
        "coverage": covered.float().mean().item(),
    }
