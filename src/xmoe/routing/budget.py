"""Compute budgets for variable-k routers: say "1.5 experts per token" instead of guessing t.

Two tools, one for training and one for inference:

- :class:`BudgetController`: a PI controller (as DTop-p steers its top-p threshold) on the
  threshold's logit ``u = logit(t)``. After every training step's routing it reads the achieved
  mean experts/token ``k`` and moves ``u`` against the relative error ``e = (k - k*) / k*``::

      u  <-  u - gain_i * e - gain_p * (e - e_prev)

  so ``t = sigmoid(u)`` stays inside ``(0, 1)`` by construction (and inside
  ``[min_threshold, max_threshold]`` by a clamp). Its state (``u``, the previous error, the
  achieved EMA) lives in buffers, so it is saved in checkpoints and resumes exactly.
- :func:`calibrate_threshold`: bisection on t for a frozen model (inference); it returns a t
  whose measured experts/token is within ``tolerance`` of the target, with the rate it gave.

Relative errors make one pair of gains work for targets from 1 to E experts per token: the
router's rate changes by a roughly constant factor per unit of ``logit(t)`` around its operating
point. The defaults settle within ~50 steps on the demo GPT (docs/results.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_positive, check_range


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class BudgetController(nn.Module):
    """Steers a threshold to a target mean number of experts per token.

    Args:
        target: the target mean experts per token, in ``[1, num_experts]``.
        num_experts: E (bounds the target).
        init_threshold: t at the start, in (0, 1). Default 0.9.
        gain_i: integral gain on the relative error (per step). Default 0.05.
        gain_p: proportional gain on the change of the relative error. Default 0.2.
        min_threshold, max_threshold: clamp of t. Defaults 1e-4 and 1 - 1e-6: t stays inside
            (0, 1), where the router's rate still responds to it.
        ema: smoothing of the logged achieved rate (the control itself uses the raw rate).
    """

    def __init__(
        self,
        target: float,
        num_experts: int,
        *,
        init_threshold: float = 0.9,
        gain_i: float = 0.05,
        gain_p: float = 0.2,
        min_threshold: float = 1e-4,
        max_threshold: float = 1.0 - 1e-6,
        ema: float = 0.9,
    ) -> None:
        super().__init__()
        check_range("target_experts_per_token", target, 1, num_experts)
        check_range("min_threshold", min_threshold, 0, 1, low_open=True, high_open=True)
        check_range("max_threshold", max_threshold, min_threshold, 1, high_open=True)
        check_range("init_threshold", init_threshold, min_threshold, max_threshold)
        check_positive("gain_i", gain_i)
        check_range("gain_p", gain_p, 0, math.inf)
        check_range("ema", ema, 0, 1, high_open=True)
        self.target = float(target)
        self.gain_i, self.gain_p, self.ema = float(gain_i), float(gain_p), float(ema)
        self.u_min, self.u_max = _logit(min_threshold), _logit(max_threshold)
        # float64 buffers: the state is a handful of scalars, and resume must be exact.
        self.register_buffer("u", torch.tensor(_logit(init_threshold), dtype=torch.float64))
        self.register_buffer("prev_error", torch.zeros((), dtype=torch.float64))
        self.register_buffer("achieved", torch.full((), float("nan"), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def threshold(self) -> float:
        """The current t, in ``[min_threshold, max_threshold]`` ⊂ (0, 1)."""
        return float(torch.sigmoid(self.u))

    @torch.no_grad()
    def update(self, experts_per_token: float) -> float:
        """One control step from this step's achieved rate; returns the new t."""
        k = float(experts_per_token)
        if not math.isfinite(k):
            raise ValueError(f"experts_per_token must be finite, got {k!r}")
        error = (k - self.target) / self.target
        first = int(self.steps) == 0
        delta = self.gain_i * error + (
            0.0 if first else self.gain_p * (error - float(self.prev_error))
        )
        self.u.fill_(min(max(float(self.u) - delta, self.u_min), self.u_max))
        self.prev_error.fill_(error)
        prev = float(self.achieved)
        self.achieved.fill_(k if math.isnan(prev) else self.ema * prev + (1 - self.ema) * k)
        self.steps += 1
        return self.threshold

    def extra_repr(self) -> str:
        return f"target={self.target}, threshold={self.threshold:.4f}, steps={int(self.steps)}"


def calibrate_threshold(
    measure: Callable[[float], float],
    target: float,
    *,
    tolerance: float = 0.02,
    iters: int = 30,
    low: float = 1e-4,
    high: float = 1.0,
) -> tuple[float, float]:
    """Bisection on t for a frozen router or model: ``measure(t)`` returns the mean experts per
    token at threshold t (non-decreasing in t). Returns ``(t, achieved)`` with ``achieved``
    within ``tolerance`` (relative) of ``target`` when reachable, else the closest end.
    """
    check_positive("target", target)
    check_positive("tolerance", tolerance)
    best = None
    lo, hi = low, high
    for _ in range(iters):
        mid = (lo + hi) / 2
        k = measure(mid)
        if best is None or abs(k - target) < abs(best[1] - target):
            best = (mid, k)
        if abs(k - target) <= tolerance * target:
            return mid, k
        if k > target:
            hi = mid
        else:
            lo = mid
    return best
