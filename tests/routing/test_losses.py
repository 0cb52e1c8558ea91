"""Router auxiliary losses (``xmoe.routing.losses``) and the routers that report them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS
from xmoe.routing import (
    NoisyTopKRouter,
    ThresholdRouter,
    cv_squared,
    entropy_loss,
    load_balance_loss,
    threshold_soft_count,
    z_loss,
)
from xmoe.routing.selection import threshold_keep

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_noisy_topk_importance_and_load_losses_are_nonnegative_with_gradients():
    router = NoisyTopKRouter(D_MODEL, 6, k=2, init_std=0.3).train()
    torch.manual_seed(0)
    routing = router(_x(64))
    imp, load = routing.losses["importance"], routing.losses["load"]
    assert float(imp.detach()) >= 0 and float(load.detach()) >= 0
    gw, gn = torch.autograd.grad(load, [router.weight, router.noise_weight], retain_graph=True)
    assert torch.isfinite(gw).all() and torch.isfinite(gn).all()
    assert gw.abs().sum() > 0 and gn.abs().sum() > 0
    (gi,) = torch.autograd.grad(imp, [router.weight])
    assert gi.abs().sum() > 0
    assert set(NoisyTopKRouter.default_loss_coefs) == {"importance", "load"}
    assert NoisyTopKRouter.default_loss_coefs["importance"] == 0.1


@FAST
@given(value=st.floats(0.01, 1e4), size=st.integers(1, 64))
def test_cv_squared_of_a_constant_vector_is_zero(value, size):
    assert float(cv_squared(torch.full((size,), value))) == pytest.approx(0.0, abs=1e-6)


def test_cv_squared_is_positive_for_an_uneven_vector():
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(2.0 / 4.0)


@pytest.mark.parametrize("e", [1, 2, 4, 16])
def test_load_balance_loss_is_one_when_uniform_and_e_when_collapsed(e):
    n = 4 * e
    uniform = torch.full((n, e), 1.0 / e)
    assigned = torch.arange(n) % e
    assert float(load_balance_loss(uniform, assigned)) == pytest.approx(1.0)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    assert float(load_balance_loss(collapsed, torch.zeros(n, dtype=torch.long))) == pytest.approx(e)


@pytest.mark.parametrize("e", [1, 2, 5, 64])
def test_z_loss_of_zero_logits_is_log_e_squared(e):
    assert float(z_loss(torch.zeros(7, e))) == pytest.approx(math.log(e) ** 2)


@FAST
@given(seed=st.integers(0, 10_000), t=st.floats(0.2, 0.95), scale=st.floats(0.5, 4.0))
def test_soft_count_approaches_hard_count_at_small_temperature(seed, t, scale):
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)) * scale
    probs = logits.softmax(-1)
    ranked = probs.sort(-1, descending=True).values
    # only tokens whose prefix masses all sit well outside the sigmoid's width around t
    ranked = ranked[((ranked.cumsum(-1) - t).abs() > 0.01).all(-1)]
    assume(ranked.shape[0] > 0)
    hard = float(threshold_keep(ranked, t).sum(-1).float().mean())
    soft = float(threshold_soft_count(ranked, t, temperature=1e-3))
    assert soft == pytest.approx(hard, abs=1e-3)


def test_entropy_loss_is_the_mean_token_entropy():
    probs = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).softmax(-1)
    expected = sum(-sum(p * math.log(p) for p in row) for row in probs.tolist()) / 10
    assert float(entropy_loss(probs)) == pytest.approx(expected, rel=1e-5)
    assert float(entropy_loss(torch.full((3, 4), 0.25))) == pytest.approx(math.log(4), rel=1e-6)


def test_threshold_router_reports_sparsity_losses_with_zero_default_coefs():
    router = ThresholdRouter(D_MODEL, NUM_EXPERTS)
    routing = router(_x(8))
    assert {"entropy", "soft_count", "load_balance", "z_loss"} <= set(routing.losses)
    assert router.default_loss_coefs["entropy"] == 0.0
    assert router.default_loss_coefs["soft_count"] == 0.0


def test_minimising_soft_count_lowers_threshold_router_experts_per_token():
    router = ThresholdRouter(D_MODEL, 8, threshold=0.9, init_std=0.05).train()
    x = _x(128, seed=4)
    start = router(x).experts_per_token
    opt = torch.optim.SGD(router.parameters(), lr=2.0)
    for _ in range(15):
        loss = router(x).losses["soft_count"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = router(x).experts_per_token
    assert start > 5.0
    assert end < start - 1.0


@pytest.mark.parametrize("assigned_kind", ["top1", "kept"])
def test_load_balance_loss_with_reduce_over_identical_shards_is_the_local_loss(assigned_kind):
    probs = torch.randn(12, 5, generator=torch.Generator().manual_seed(3)).softmax(-1)
    if assigned_kind == "top1":
        assigned = probs.argmax(-1)
    else:
        assigned = probs.topk(2, dim=-1).indices.reshape(-1)
    local = load_balance_loss(probs, assigned)
    # identity (one rank) and two identical ranks (a sum of two equal shards) give the local value
    for reduce in (lambda t: t, lambda t: 2 * t):
        got = load_balance_loss(probs, assigned, reduce)
        torch.testing.assert_close(got, local, atol=1e-6, rtol=0)
    # a rank without tokens gets 0 (not NaN) when no rank has any
    empty = load_balance_loss(probs[:0], assigned[:0], lambda t: t)
    assert float(empty) == 0.0


def test_router_uses_reduce_stats_for_load_balance_in_training_only():
    router = ThresholdRouter(D_MODEL, NUM_EXPERTS, threshold=0.7)
    x = _x(16)
    want = router.train()(x).losses["load_balance"]
    seen = []
    router.reduce_stats = lambda t: seen.append(t.shape) or 2 * t
    got = router(x).losses["load_balance"]
    assert seen == [(2 * NUM_EXPERTS + 2,)]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    router.eval()(x)
    assert len(seen) == 1
