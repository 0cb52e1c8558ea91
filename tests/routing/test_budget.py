"""The compute-budget controller and the inference calibration steer t to a target rate."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe.routing import ThresholdRouter
from xmoe.routing.budget import BudgetController, calibrate_threshold


def _stream(seed: int, n: int = 512, d: int = 32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen)


def _router(e: int = 16, d: int = 32) -> ThresholdRouter:
    torch.manual_seed(0)
    return ThresholdRouter(d, e, threshold=0.9).eval()


@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 4.0])
def test_controller_converges_on_a_stationary_stream(target):
    router = _router()
    ctrl = BudgetController(target, 16)
    achieved = []
    for step in range(300):
        router.threshold = ctrl.threshold
        k = router(_stream(step)).experts_per_token
        ctrl.update(k)
        achieved.append(k)
    # The tolerance: the mean of the last 50 steps within 3% of the target.
    tail = sum(achieved[-50:]) / 50
    assert abs(tail - target) <= 0.03 * target, (target, tail)


def test_threshold_never_leaves_the_open_unit_interval():
    ctrl = BudgetController(1.0, 8)
    for _ in range(2000):  # always too many experts: t is pushed down as far as it goes
        t = ctrl.update(8.0)
        assert 0.0 < t < 1.0
    assert t == pytest.approx(1e-4, rel=1e-6)
    ctrl = BudgetController(8.0, 8)
    for _ in range(2000):  # never enough: t is pushed up, but stays below 1
        t = ctrl.update(1.0)
        assert 0.0 < t < 1.0
    assert t == pytest.approx(1.0 - 1e-6, abs=1e-9)


def test_controller_resumes_exactly_from_its_state_dict():
    rates = [1.0 + 3.0 * abs(math.sin(i)) for i in range(60)]
    a = BudgetController(1.5, 16)
    for k in rates[:30]:
        a.update(k)
    b = BudgetController(1.5, 16)
    b.load_state_dict(a.state_dict())
    for k in rates[30:]:
        assert a.update(k) == b.update(k)
    assert torch.equal(a.u, b.u) and int(a.steps) == int(b.steps) == 60


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=0.5, num_experts=8), "target_experts_per_token"),
        (dict(target=9.0, num_experts=8), "target_experts_per_token"),
        (dict(target=2.0, num_experts=8, gain_i=0.0), "gain_i"),
        (dict(target=2.0, num_experts=8, init_threshold=1.0), "init_threshold"),
    ],
)
def test_bad_controller_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetController(**kwargs)


def test_update_rejects_a_non_finite_rate():
    with pytest.raises(ValueError, match="finite"):
        BudgetController(2.0, 8).update(float("nan"))


def test_calibration_finds_a_threshold_for_the_target_rate():
    router = _router()
    x = _stream(0, n=2048)

    def measure(t: float) -> float:
        router.threshold = t
        with torch.no_grad():
            return router(x).experts_per_token

    t, achieved = calibrate_threshold(measure, 1.5)
    assert 0 < t < 1 and abs(achieved - 1.5) <= 0.02 * 1.5
    assert measure(t) == achieved


def test_threshold_router_with_a_budget_steers_itself_in_training_only():
    torch.manual_seed(0)
    router = ThresholdRouter(32, 16, threshold=0.9, target_experts_per_token=1.5)
    achieved = []
    for step in range(300):
        r = router(_stream(step))
        achieved.append(r.experts_per_token)
        assert 0 < float(r.extras["threshold"]) < 1
    assert abs(sum(achieved[-50:]) / 50 - 1.5) <= 0.05 * 1.5
    router.eval()
    t = router.budget.threshold
    steps = int(router.budget.steps)
    for step in range(5):
        router(_stream(1000 + step))
    assert router.threshold == t and int(router.budget.steps) == steps
    # The controller's state travels with the router's state_dict (checkpoints).
    assert {"budget.u", "budget.steps"} <= set(router.state_dict())


def test_budget_uses_the_global_rate_when_statistics_are_reduced():
    torch.manual_seed(0)
    a = ThresholdRouter(32, 16, threshold=0.9, target_experts_per_token=2.0)
    b = ThresholdRouter(32, 16, threshold=0.9, target_experts_per_token=2.0)
    b.load_state_dict(a.state_dict())
    # A fake 2-rank reduction whose other rank saw the same batch: the global rate is the local
    # one, so both routers must steer identically.
    b.reduce_stats = lambda t: 2 * t
    for step in range(20):
        ra, rb = a(_stream(step)), b(_stream(step))
        assert ra.num_pairs == rb.num_pairs
    assert torch.equal(a.budget.u, b.budget.u)
