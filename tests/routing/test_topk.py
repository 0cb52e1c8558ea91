"""Top-k family (``xmoe.routing.topk``): top-k, Switch and GShard; noisy top-k's k pairs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS, make_moe
from xmoe import MoE
from xmoe.routing import GShardRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _pairs_per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


# --------------------------------------------------------------------------------------------
# Top-k family
# --------------------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 20),
    e=st.integers(1, 8),
    data=st.data(),
    kind=st.sampled_from(["topk", "noisy_topk", "gshard"]),
    training=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_top_k_family_gives_exactly_k_distinct_pairs_per_token(n, e, data, kind, training, seed):
    if kind == "gshard":
        assume(e >= 2)
        training = False  # random routing drops 2nd experts in training
        router, k = GShardRouter(D_MODEL, e, init_std=0.5), 2
    else:
        k = data.draw(st.integers(1, e), label="k")
        cls = TopKRouter if kind == "topk" else NoisyTopKRouter
        router = cls(D_MODEL, e, k=k, init_std=0.5)
    router.train(training)
    torch.manual_seed(seed)
    routing = router(_x(n, seed=seed))
    assert routing.num_pairs == n * k
    assert (_pairs_per_token(routing) == k).all()
    assert len(set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist()))) == n * k
    assert int(routing.expert_idx.min()) >= 0 and int(routing.expert_idx.max()) < e
    assert sorted(set(routing.rank.tolist())) == list(range(k))


# --------------------------------------------------------------------------------------------
# Switch
# --------------------------------------------------------------------------------------------


def _skewed_switch(**kw):
    moe = make_moe(router="switch", init_std=0.1, **kw)
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # x + 1 below: expert 0 wins most tokens
    return moe


def test_switch_defaults_to_capacity_factor_1_25_in_training():
    moe = _skewed_switch()
    assert moe.capacity_factor == 1.25
    assert moe.eval_capacity_factor is None
    assert MoE(D_MODEL, NUM_EXPERTS, 8, router="topk").capacity_factor is None
    moe.train()
    for n in (8, 10, 37, 100):
        moe(_x(n, seed=n) + 1.0)
        routing = moe.last_routing
        cap = math.ceil(1.25 * n / NUM_EXPERTS)
        assert int(routing.expert_counts.max()) <= cap
        assert routing.dropped_fraction > 0  # the skew really overflows expert 0
        assert routing.num_selected == n
    moe.eval()
    moe(_x(100) + 1.0)
    assert moe.last_routing.dropped_fraction == 0.0 and moe.last_routing.num_pairs == 100


def test_switch_with_dropless_capacity_keeps_every_token():
    moe = _skewed_switch(capacity_factor="dropless")
    assert moe.capacity_factor is None
    moe.train()
    moe(_x(100) + 1.0)
    routing = moe.last_routing
    assert routing.num_pairs == 100 and routing.dropped_fraction == 0.0
    assert int(routing.expert_counts.max()) > math.ceil(1.25 * 100 / NUM_EXPERTS)


def test_switch_is_top1_and_router_init_std_is_sqrt_point1_over_d_model():
    d = 256
    router = SwitchRouter(d, 64)
    assert router.k == 1
    std = float(router.weight.detach().std())
    assert std == pytest.approx(math.sqrt(0.1 / d), rel=0.05)
    assert GShardRouter(d, 64).init_std == pytest.approx(0.02)


# --------------------------------------------------------------------------------------------
# GShard random routing
# --------------------------------------------------------------------------------------------


def test_gshard_keeps_second_expert_with_probability_two_g2_and_first_weight_is_g1():
    n = 6000
    router = GShardRouter(D_MODEL, 6, init_std=0.4).train()
    x = _x(n, seed=3)
    torch.manual_seed(11)
    routing = router(x)
    probs = (x @ router.weight.detach().T).softmax(-1).double()
    top = probs.topk(2, dim=-1)
    g1 = top.values[:, 0] / top.values.sum(-1)
    g2 = 1 - g1
    first = routing.rank == 0
    # every token keeps its first expert with weight g1 (no renormalisation after the drop)
    assert int(first.sum()) == n
    assert torch.equal(routing.expert_idx[first], top.indices[routing.token_idx[first], 0])
    torch.testing.assert_close(
        routing.weight[first].double(), g1[routing.token_idx[first]], atol=1e-6, rtol=0
    )
    kept2 = torch.zeros(n, dtype=torch.bool)
    second = ~first
    kept2[routing.token_idx[second]] = True
    assert torch.equal(routing.expert_idx[second], top.indices[routing.token_idx[second], 1])
    torch.testing.assert_close(
        routing.weight[second].double(), g2[routing.token_idx[second]], atol=1e-6, rtol=0
    )
    # P(keep 2nd) = 2 * g2: overall and within g2 bins, within 5 standard deviations.
    p = (2 * g2).clamp(max=1)
    for mask in (torch.ones(n, dtype=torch.bool), g2 < 0.25, g2 >= 0.35):
        assert int(mask.sum()) > 300
        expected = float(p[mask].sum())
        sd = math.sqrt(float((p[mask] * (1 - p[mask])).sum()))
        observed = int(kept2[mask].sum())
        assert abs(observed - expected) < 5 * sd + 1, (observed, expected, sd)
    # the drop is visible and is not counted as a capacity drop
    assert 0 < int(kept2.sum()) < n
    assert routing.dropped_fraction == 0.0


def test_gshard_without_random_routing_keeps_both_experts_in_training():
    router = GShardRouter(D_MODEL, 4, init_std=0.4, random_routing=False).train()
    assert (_pairs_per_token(router(_x(50))) == 2).all()
