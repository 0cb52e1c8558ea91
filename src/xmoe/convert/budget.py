"""Per-layer thresholds fitted to a global FFN FLOP budget.

One global t keeps very different fractions of each layer's experts, and the layers do not
suffer equally from it. Here each layer l gets its own t_l, chosen so that every layer meets
one common quality criterion ε, with ε the smallest value whose mean FFN FLOP fraction is
within the budget (bisection on ε).

Quality criterion: the relative error that dropping experts at t adds to the layer's output,
``||y_t - y_1|| / ||y_1 + r||`` on calibration rows, where ``y_t`` is the FFN output at t, ``y_1``
the output with every expert, and ``r`` the residual added to the FFN output (the FFN input for
post-LN BERT blocks, ``residual=True``; zero otherwise). It is measured on each layer's inputs in
the model as it is, every layer at t = 1, so it is a per-layer proxy, not an end-to-end error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_range
from .calibrate import capture_input
from .convert import converted_ffns, set_thresholds
from .ffn import ConvertedFFN

GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0
CURVE_TOKENS = 4096


@dataclass
class LayerCurve:
    """One layer's trade-off: FFN FLOP fraction and relative error at each grid threshold."""

    thresholds: list[float]
    flop_fraction: list[float]
    error: list[float]

    def pick(self, eps: float) -> int:
        """Index of the smallest threshold whose error is at most ``eps`` (the last if none)."""
        for i, e in enumerate(self.error):
            if e <= eps:
                return i
        return len(self.error) - 1


@torch.no_grad()
def layer_curve(
    ffn: ConvertedFFN, x: Tensor, residual: bool, grid: tuple[float, ...] = GRID
) -> LayerCurve:
    """The trade-off of ``ffn`` at its current mode over ``grid``, on input rows ``x``."""
    dense = ffn.to_dense()
    E, h = ffn.num_experts, ffn.d_expert
    acts = dense.neuron_acts(x).float().view(-1, E, h)
    w2 = ffn.experts.w2.detach().float()  # [E, h, d]
    parts = torch.einsum("neh,ehd->ned", acts, w2)  # each expert's output, [N, E, d]
    full = parts.sum(1)
    ref = full + (x if residual else 0)
    if ffn.out_bias is not None:
        ref = ref + ffn.out_bias.detach().float()
    norm = float(ref.norm())
    old = ffn.threshold
    fracs, errs = [], []
    try:
        for t in grid:
            ffn.set_threshold(t)
            mask = ffn.keep_mask(x).float()
            y = torch.einsum("ne,ned->nd", mask, parts)
            errs.append(float((y - full).norm()) / max(norm, 1e-30))
            kept = float(mask.sum(1).mean())
            fracs.append(ffn.flops_per_token(kept) / ffn.dense_flops_per_token)
    finally:
        ffn.set_threshold(old)
    return LayerCurve(list(grid), fracs, errs)


def fit_thresholds(curves: list[LayerCurve], budget: float, iters: int = 60) -> dict:
    """Per-layer thresholds meeting the mean FLOP ``budget`` with the smallest common error.

    Returns ``{"budget", "thresholds", "flop_fraction", "error_bound"}`` (the predicted mean
    FLOP fraction on the calibration rows). If even the smallest grid threshold everywhere
    exceeds the budget, that is returned (and ``flop_fraction`` says so).
    """
    check_range("budget (--flop-budget)", budget, 0.0, 1.0, low_open=True)

    def mean_flops(eps: float) -> float:
        return sum(c.flop_fraction[c.pick(eps)] for c in curves) / len(curves)

    lo, hi = 0.0, max(max(c.error) for c in curves) + 1e-9
    if mean_flops(0.0) <= budget:
        hi = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean_flops(mid) <= budget:
            hi = mid
        else:
            lo = mid
    picks = [c.pick(hi) for c in curves]
    return {
        "budget": budget,
        "thresholds": [c.thresholds[i] for c, i in zip(curves, picks, strict=True)],
        "flop_fraction": sum(c.flop_fraction[i] for c, i in zip(curves, picks, strict=True))
        / len(curves),
        "error_bound": hi,
    }


def fit_budget(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    budget: float,
    residual: bool = False,
    tokens: int = CURVE_TOKENS,
) -> dict:
    """Measure every converted FFN's curve on calibration ``batches`` (its first ``tokens``
    rows; inputs captured with every layer at t = 1) and fit per-layer thresholds to
    ``budget``. Applies them (:func:`set_thresholds`) and returns :func:`fit_thresholds`'s
    result plus the curves."""
    ffns = converted_ffns(model)
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no converted FFNs")
    old = [f.threshold for f in ffns]
    for f in ffns:
        f.set_threshold(1.0)
    sub = spread_batches(batches, tokens)
    try:
        curves = [layer_curve(f, capture_input(model, f, sub)[:tokens], residual) for f in ffns]
    finally:
        for f, t in zip(ffns, old, strict=True):
            f.set_threshold(t)
    fit = fit_thresholds(curves, budget)
    set_thresholds(model, fit["thresholds"])
    fit["curves"] = [
        {
            "flop_fraction": [round(v, 4) for v in c.flop_fraction],
            "error": [round(v, 5) for v in c.error],
        }
        for c in curves
    ]
    fit["grid"] = list(GRID)
    return fit


def spread_batches(batches: list[dict[str, Tensor]], tokens: int) -> list[dict[str, Tensor]]:
    """Evenly spaced batches (they are sorted by length) holding at least ``tokens``
    non-padding tokens, or all of them."""
    sizes = [int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in batches]
    total = sum(sizes)
    if not total or total <= tokens:
        return batches
    for step in range(max(1, total // tokens), 1, -1):
        if sum(sizes[::step]) >= tokens:
            return batches[::step]
    return batches
