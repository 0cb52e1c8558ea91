"""Per-layer thresholds fitted to a global FFN FLOP budget (convert/budget.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import converted  # noqa: E402

from xmoe.convert.budget import LayerCurve, fit_budget, fit_thresholds, layer_curve  # noqa: E402
from xmoe.convert.calibrate import capture_input  # noqa: E402
from xmoe.convert.convert import converted_ffns  # noqa: E402


def _curve(fracs, errs):
    return LayerCurve([0.25, 0.5, 0.75, 1.0], fracs, errs)


def test_fit_thresholds_hand_computed():
    # layer a is cheap to sparsify (its error falls fast), layer b is not
    a = _curve([0.25, 0.5, 0.75, 1.0], [0.10, 0.02, 0.01, 0.0])
    b = _curve([0.25, 0.5, 0.75, 1.0], [0.40, 0.20, 0.05, 0.0])
    # budget 0.625: (0.5 + 0.75) / 2, common error 0.05 (a at 0.5 has 0.02 <= 0.05)
    fit = fit_thresholds([a, b], 0.625)
    assert fit["thresholds"] == [0.5, 0.75]
    assert fit["flop_fraction"] == pytest.approx(0.625)
    assert fit["error_bound"] == pytest.approx(0.05, abs=1e-6)
    # a budget everything meets at zero error: all at t = 1
    assert fit_thresholds([a, b], 1.0)["thresholds"] == [1.0, 1.0]
    # an impossible budget: the smallest thresholds, and the FLOP fraction says it is over
    fit = fit_thresholds([a, b], 0.1)
    assert fit["thresholds"] == [0.25, 0.25] and fit["flop_fraction"] > 0.1


def test_fit_thresholds_brute_force_over_all_combinations():
    g = torch.Generator().manual_seed(3)
    curves = []
    for _ in range(3):
        errs = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
        errs[-1] = 0.0
        curves.append(_curve([0.25, 0.5, 0.75, 1.0], errs))
    for budget in (0.3, 0.5, 0.7, 0.9):
        fit = fit_thresholds(curves, budget)
        # brute force: the smallest max-error over combinations within the budget, where each
        # layer takes the smallest t meeting that error
        best = None
        for eps in sorted({e for c in curves for e in c.error}):
            frac = sum(c.flop_fraction[c.pick(eps)] for c in curves) / 3
            if frac <= budget + 1e-12:
                best = eps
                break
        if best is not None:
            assert fit["flop_fraction"] <= budget + 1e-9
            assert fit["error_bound"] <= best + 1e-6


def test_fit_thresholds_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="flop-budget"):
        fit_thresholds([_curve([1, 1, 1, 1], [0, 0, 0, 0])], 1.5)


def test_layer_curve_ends_exact_and_fit_budget_meets_it_on_calibration():
    model, _, batches, _ = converted("bert", experts=4, steps=30)
    ffn = converted_ffns(model)[0]
    x = capture_input(model, ffn, batches)
    curve = layer_curve(ffn, x, residual=False)
    assert curve.error[-1] == pytest.approx(0.0, abs=1e-6)  # t = 1 keeps every expert
    assert curve.flop_fraction[-1] > 1.0  # all experts plus the router
    # brute force at one grid point: the masked sum of experts vs the full FFN
    with torch.no_grad():
        ffn.set_threshold(curve.thresholds[4])
        y = ffn(x) - ffn.out_bias
        ffn.set_threshold(1.0)
        full = ffn(x) - ffn.out_bias
        err = float((y - full).norm() / (full + ffn.out_bias).norm())
    assert curve.error[4] == pytest.approx(err, rel=1e-4, abs=1e-6)
    fit = fit_budget(model, batches, 0.6)
    assert fit["flop_fraction"] <= 0.6
    assert [f.threshold for f in converted_ffns(model)] == fit["thresholds"]
