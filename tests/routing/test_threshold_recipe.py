"""The threshold router's recipe choices that the paper ablation varies, against loop oracles:
the load-balance f_i (top-1 argmax or every kept pair), raw vs renormalised combine weights and
the init scale (xmoe's 3/sqrt(d) against nn.Linear's 1/sqrt(3d))."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe import ThresholdRouter

D, E = 24, 16


def _oracle_load_balance(probs, counted):
    """E * sum_e f_e * P_e with plain loops: f_e over the counted assignments, P_e the mean p."""
    n, e = probs.shape
    total = 0.0
    for j in range(e):
        f = sum(1 for a in counted if a == j) / len(counted)
        p = sum(float(probs[i, j]) for i in range(n)) / n
        total += f * p
    return e * total


@pytest.mark.parametrize("balance_over", ["top1", "kept"])
def test_load_balance_counts_the_argmax_or_every_kept_pair(balance_over):
    torch.manual_seed(0)
    router = ThresholdRouter(D, E, threshold=0.7, balance_over=balance_over, init_std=0.3).train()
    x = torch.randn(40, D)
    routing = router(x)
    probs = (x @ router.weight.T).softmax(-1)
    if balance_over == "top1":
        counted = [int(probs[i].argmax()) for i in range(x.shape[0])]
    else:
        counted = [int(e) for e in routing.expert_idx]
        assert len(counted) > x.shape[0]  # t = 0.7 keeps more than one expert for some tokens
    want = _oracle_load_balance(probs.detach(), counted)
    assert routing.losses["load_balance"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_combine_weights_are_raw_or_renormalised_probabilities(renormalize):
    torch.manual_seed(1)
    router = ThresholdRouter(D, E, threshold=0.8, renormalize=renormalize, init_std=0.3)
    x = torch.randn(12, D)
    routing = router(x)
    probs = (x @ router.weight.T).softmax(-1).detach()
    for i in range(x.shape[0]):
        kept = [
            (int(e), float(w))
            for t, e, w in zip(routing.token_idx, routing.expert_idx, routing.weight.detach())
            if int(t) == i
        ]
        mass = sum(float(probs[i, e]) for e, _ in kept)
        for e, w in kept:
            want = float(probs[i, e]) / mass if renormalize else float(probs[i, e])
            assert w == pytest.approx(want, rel=1e-5)
        assert sum(w for _, w in kept) == pytest.approx(1.0 if renormalize else mass, rel=1e-5)


def test_default_init_is_3_over_sqrt_d_and_a_linear_like_init_is_flatter():
    torch.manual_seed(2)
    d, e = 128, 64
    default = ThresholdRouter(d, e)
    linear = ThresholdRouter(d, e, init_std=1 / math.sqrt(3 * d))
    assert default.init_std == pytest.approx(3 / math.sqrt(d))
    for router in (default, linear):
        assert float(router.weight.detach().std()) == pytest.approx(router.init_std, rel=0.05)
    # nn.Linear's kaiming-uniform init has the same std: U(-1/sqrt(d), 1/sqrt(d)).
    ref = torch.nn.Linear(d, e, bias=False).weight
    assert float(ref.detach().std()) == pytest.approx(linear.init_std, rel=0.05)
    # On unit-variance inputs the flatter init keeps many more experts at t = 0.9.
    x = torch.randn(512, d)
    assert linear(x).experts_per_token > 2 * default(x).experts_per_token
