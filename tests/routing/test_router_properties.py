"""Properties of the router zoo: the paper-specific rules of each router, its losses and options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS, make_moe, reference_threshold
from xmoe import MoE
from xmoe.routing import (
    BalancedAssignmentRouter,
    ExpertChoiceRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    SwitchRouter,
    ThresholdRouter,
    TopKRouter,
    cv_squared,
    entropy_loss,
    load_balance_loss,
    threshold_soft_count,
    z_loss,
)
from xmoe.routing.assignment import balanced_assignment
from xmoe.routing.selection import threshold_keep

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _pairs_per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


def _expert_choice(*args, **kwargs):
    with pytest.warns(UserWarning, match="leak"):
        return ExpertChoiceRouter(*args, **kwargs)


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


# --------------------------------------------------------------------------------------------
# Expert Choice
# --------------------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 30),
    e=st.integers(1, 6),
    c=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 10.0]),
    seed=st.integers(0, 100),
)
def test_expert_choice_gives_each_expert_min_n_ceil_c_n_over_e_top_tokens(n, e, c, seed):
    router = _expert_choice(D_MODEL, e, expert_capacity=c, init_std=0.5)
    x = _x(n, seed=seed)
    routing = router(x)
    quota = min(n, math.ceil(c * n / e))
    assert routing.expert_counts.tolist() == [quota] * e
    probs = (x @ router.weight.detach().T).softmax(-1)
    for ex in range(e):
        toks = routing.token_idx[routing.expert_idx == ex].tolist()
        assert len(set(toks)) == quota
        # they are the expert's top-quota tokens by probability
        chosen_min = float(probs[toks, ex].min())
        others = [t for t in range(n) if t not in set(toks)]
        if others:
            assert float(probs[others, ex].max()) <= chosen_min + 1e-7


def test_expert_choice_warns_about_causal_leakage_on_construction():
    with pytest.warns(UserWarning, match="future"):
        MoE(D_MODEL, NUM_EXPERTS, 8, router="expert_choice")


# --------------------------------------------------------------------------------------------
# BASE: balanced assignment
# --------------------------------------------------------------------------------------------


def _brute_force_best(scores):
    """Max total score over every balanced (floor/ceil N/E per expert) assignment."""
    n, e = scores.shape
    lo, hi = n // e, -(-n // e)
    best = -math.inf
    s = scores.tolist()
    for assign in itertools.product(range(e), repeat=n):
        counts = [assign.count(ex) for ex in range(e)]
        if min(counts) < lo or max(counts) > hi:
            continue
        best = max(best, sum(s[t][a] for t, a in enumerate(assign)))
    return best


def _is_balanced(assign, n, e):
    counts = torch.bincount(assign, minlength=e)
    return bool(((counts == n // e) | (counts == -(-n // e))).all())


@FAST
@given(n=st.integers(1, 7), e=st.integers(1, 4), seed=st.integers(0, 10_000))
@example(n=7, e=3, seed=0)  # E does not divide N
@example(n=2, e=4, seed=1)  # N < E
@example(n=6, e=3, seed=2)
def test_base_hungarian_assignment_is_balanced_and_exactly_optimal(n, e, seed):
    assume(e**n <= 5000)
    scores = torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assign = balanced_assignment(scores, "hungarian")
    assert assign.shape == (n,) and assign.dtype == torch.long
    assert _is_balanced(assign, n, e)
    total = float(scores[torch.arange(n), assign].sum())
    assert total == pytest.approx(_brute_force_best(scores), abs=1e-9)


@FAST
@given(n=st.integers(1, 7), e=st.integers(1, 4), seed=st.integers(0, 10_000))
@example(n=7, e=3, seed=0)  # E does not divide N
@example(n=2, e=4, seed=1)  # N < E
@example(n=6, e=3, seed=2)
def test_base_auction_assignment_is_balanced_and_optimal_within_1e_6(n, e, seed):
    assume(e**n <= 5000)
    scores = torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assign = balanced_assignment(scores, "auction")
    assert _is_balanced(assign, n, e)
    total = float(scores[torch.arange(n), assign].sum())
    best = _brute_force_best(scores)
    assert abs(total - best) <= 1e-6 * max(1.0, abs(best))


@pytest.mark.parametrize("method", ["hungarian", "auction"])
def test_base_assignment_is_balanced_for_larger_uneven_batches(method):
    scores = torch.randn(203, 7, generator=torch.Generator().manual_seed(0))
    scores[:, 0] += 3.0  # every token prefers expert 0
    assign = balanced_assignment(scores, method)
    assert _is_balanced(assign, 203, 7)


def test_base_auction_matches_hungarian_total_on_a_bigger_problem():
    scores = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = float(scores[torch.arange(300), balanced_assignment(scores, "hungarian")].sum())
    approx = float(scores[torch.arange(300), balanced_assignment(scores, "auction")].sum())
    assert abs(exact - approx) <= 1e-6 * abs(exact)


@pytest.mark.parametrize(("n", "e"), [(40, 4), (13, 5), (3, 8)])
def test_base_sinkhorn_returns_valid_expert_ids(n, e):
    scores = torch.randn(n, e, generator=torch.Generator().manual_seed(n))
    assign = balanced_assignment(scores, "sinkhorn")
    assert assign.shape == (n,) and assign.dtype == torch.long
    assert int(assign.min()) >= 0 and int(assign.max()) < e


@pytest.mark.parametrize("n", [3, 10, 24])
def test_base_router_is_balanced_in_training_and_argmax_in_eval(n):
    router = BalancedAssignmentRouter(D_MODEL, NUM_EXPERTS, init_std=0.5)
    with torch.no_grad():
        router.weight[1] += 0.5  # an unbalanced greedy choice
    x = _x(n, seed=n) + 0.5
    logits = x @ router.weight.detach().T
    routing = router.train()(x)
    assert routing.token_idx.tolist() == list(range(n))
    assert _is_balanced(routing.expert_idx, n, NUM_EXPERTS)
    torch.testing.assert_close(
        routing.weight, torch.sigmoid(logits[torch.arange(n), routing.expert_idx])
    )
    assert routing.losses == {}
    routing = router.eval()(x)
    assert torch.equal(routing.expert_idx, logits.argmax(-1))
    assert (routing.rank == 0).all()
    torch.testing.assert_close(routing.weight, torch.sigmoid(logits.max(-1).values))


# --------------------------------------------------------------------------------------------
# Hash
# --------------------------------------------------------------------------------------------


def test_hash_routing_is_deterministic_across_calls_and_same_seed_routers():
    a = HashRouter(D_MODEL, 4, vocab_size=97, seed=5)
    b = HashRouter(D_MODEL, 4, vocab_size=97, seed=5)
    c = HashRouter(D_MODEL, 4, vocab_size=97, seed=6)
    ids = torch.randint(0, 97, (200,))
    x = _x(200)
    r1, r2, r3 = a(x, token_ids=ids), a(x, token_ids=ids), b(_x(200, seed=9), token_ids=ids)
    assert torch.equal(r1.expert_idx, r2.expert_idx) and torch.equal(r1.expert_idx, r3.expert_idx)
    assert torch.equal(r1.expert_idx, a.table[ids])
    assert not torch.equal(a.table, c.table)
    # same id -> same expert, whatever the position
    for i in ids.unique().tolist():
        assert len(set(r1.expert_idx[ids == i].tolist())) == 1
    assert (r1.weight == 1).all() and r1.losses == {}
    assert list(a.parameters()) == []


@pytest.mark.parametrize(("vocab", "e"), [(100, 4), (103, 4), (50, 7), (3, 5)])
def test_hash_random_table_gives_each_expert_vocab_over_e_ids(vocab, e):
    counts = torch.bincount(HashRouter(D_MODEL, e, vocab_size=vocab).table, minlength=e)
    assert int(counts.sum()) == vocab
    assert int(counts.max()) - int(counts.min()) <= 1
    assert int(counts.min()) >= vocab // e - 1 and int(counts.max()) <= -(-vocab // e) + 1


def _expert_loads(table, counts, e):
    return torch.zeros(e, dtype=torch.float64).index_add(0, table, counts.double())


def test_hash_frequency_balance_equalises_total_frequency_on_zipf_counts():
    vocab, e = 2000, 8
    zipf = (1e6 / torch.arange(1, vocab + 1, dtype=torch.float64)).round()
    zipf = zipf[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    random_router = HashRouter(D_MODEL, e, vocab_size=vocab, balance="random")
    freq_router = HashRouter(D_MODEL, e, vocab_size=vocab, balance="frequency")
    assert torch.equal(freq_router.table, random_router.table)  # random until fitted
    freq_router.fit_frequencies(zipf)
    random_router.fit_frequencies(zipf)  # a no-op for balance="random"
    assert torch.equal(random_router.table, HashRouter(D_MODEL, e, vocab_size=vocab).table)
    rl = _expert_loads(random_router.table, zipf, e)
    fl = _expert_loads(freq_router.table, zipf, e)
    assert float(fl.sum()) == float(zipf.sum())
    random_ratio, freq_ratio = float(rl.max() / rl.min()), float(fl.max() / fl.min())
    assert freq_ratio < 1.02
    assert freq_ratio - 1 < 0.1 * (random_ratio - 1)


def test_hash_fit_frequencies_rejects_wrong_shape():
    router = HashRouter(D_MODEL, 4, vocab_size=10, balance="frequency")
    with pytest.raises(ValueError, match="shape"):
        router.fit_frequencies(torch.ones(11))


def test_hash_requires_in_range_token_ids():
    moe = MoE(D_MODEL, 4, 8, router="hash", vocab_size=10)
    x = _x(5)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match="vocab_size"):
        moe(x, token_ids=torch.tensor([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match="vocab_size"):
        moe(x, token_ids=torch.tensor([0, -1, 2, 3, 4]))
    with pytest.raises(ValueError, match="one id per token"):
        moe(x, token_ids=torch.tensor([0, 1]))
    assert moe(x, token_ids=torch.tensor([0, 1, 2, 3, 9])).shape == x.shape


# --------------------------------------------------------------------------------------------
# Null experts
# --------------------------------------------------------------------------------------------


@FAST
@given(
    kind=st.sampled_from(["threshold", "topk"]),
    z=st.integers(1, 4),
    t=st.floats(0.3, 0.95),
    k=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_null_experts_are_never_computed_and_null_fraction_is_exact(kind, z, t, k, seed):
    e, n = NUM_EXPERTS, 30
    if kind == "threshold":
        router = ThresholdRouter(D_MODEL, e, threshold=t, num_null_experts=z, init_std=0.5)
    else:
        router = TopKRouter(D_MODEL, e, k=k, num_null_experts=z, init_std=0.5)
    assert router.weight.shape == (e + z, D_MODEL)
    x = _x(n, seed=seed)
    routing = router(x)
    assert routing.num_experts == e
    assert all(ex < e for ex in routing.expert_idx.tolist())
    probs = (x @ router.weight.detach().T).softmax(-1)  # over E + Z
    if kind == "threshold":
        sel = reference_threshold(probs, t)
        assume(_away_from_threshold(probs, t))
    else:
        sel = [[(int(ex), r) for r, ex in enumerate(row)] for row in probs.topk(k, -1).indices]
    real = {(tok, ex) for tok, s in enumerate(sel) for ex, _ in s if ex < e}
    assert set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist())) == real
    hit = [any(ex >= e for ex, _ in s) for s in sel]
    nf = float(routing.extras["null_fraction"])
    assert 0.0 <= nf <= 1.0
    assert nf == pytest.approx(sum(hit) / n)


def _away_from_threshold(probs, t, eps=1e-5):
    for row in probs.double().sort(-1, descending=True).values.tolist():
        acc = 0.0
        for v in row:
            acc += v
            if abs(acc - t) < eps:
                return False
    return True


def test_null_expert_mass_counts_toward_the_threshold():
    e, z = 4, 1
    router = ThresholdRouter(D_MODEL, e, threshold=0.9, num_null_experts=z)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[e, 0] = 1.0  # the null expert's logit is x[:, 0]; real logits are 0
    x = torch.zeros(3, D_MODEL)
    x[:, 0] = torch.tensor([10.0, 2.0, -5.0])
    # token 0: p_null ~ 0.9998 >= 0.9 alone -> nothing computed.
    # token 1: p_null = e^2 / (e^2 + 4) = 0.649, each real 0.088: prefix masses before ranks
    #   1..4 are 0.649, 0.737, 0.825, 0.912 -> null + 3 real experts (if the null's mass did
    #   not count, the real experts alone, 0.35 in all, would never reach t: all 4 kept).
    # token 2: null is last; four real experts of 0.25 each: ranks until mass >= 0.9 -> all 4.
    routing = router(x)
    per_token = _pairs_per_token(routing).tolist()
    assert per_token == [0, 3, 4]
    assert float(routing.extras["null_fraction"]) == pytest.approx(2 / 3)
    moe = MoE(D_MODEL, e, 8, router=router)
    y = moe(x)
    assert torch.equal(y[0], torch.zeros(D_MODEL))  # an all-null token gets zero MoE output


# --------------------------------------------------------------------------------------------
# Loss-free balancing
# --------------------------------------------------------------------------------------------


def test_loss_free_bias_moves_toward_underloaded_experts_only_in_training():
    rate = 0.01
    router = TopKRouter(
        D_MODEL, NUM_EXPERTS, k=1, loss_free_balance=True, bias_update_rate=rate, init_std=0.5
    )
    with torch.no_grad():
        router.weight[0] += 0.3
    x = _x(64) + 0.5
    assert torch.equal(router.selection_bias, torch.zeros(NUM_EXPERTS))
    load = torch.bincount((x @ router.weight.detach().T).argmax(-1), minlength=NUM_EXPERTS)
    router.train()(x)
    expected = rate * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(router.selection_bias, expected, atol=0, rtol=0)
    assert float(router.selection_bias[int(load.argmax())]) < 0  # overloaded expert pushed down
    before = router.selection_bias.clone()
    router.eval()(x)
    router.eval()(x)
    assert torch.equal(router.selection_bias, before)
    assert not any(b.requires_grad for b in router.buffers())


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_loss_free_bias_changes_selection_but_not_combine_weights(kind):
    opts = dict(loss_free_balance=True, init_std=0.5)
    router = (
        TopKRouter(D_MODEL, NUM_EXPERTS, k=2, **opts)
        if kind == "topk"
        else ThresholdRouter(D_MODEL, NUM_EXPERTS, threshold=0.6, **opts)
    )
    router.selection_bias.copy_(torch.tensor([0.5, 0.0, 0.0, -0.5]))
    x = _x(64)
    routing = router.eval()(x)
    probs = (x @ router.weight.detach().T).softmax(-1)
    torch.testing.assert_close(routing.weight, probs[routing.token_idx, routing.expert_idx])
    torch.testing.assert_close(routing.score, probs[routing.token_idx, routing.expert_idx])
    top1 = routing.expert_idx[routing.rank == 0]
    assert (top1 == 0).float().mean() > (probs.argmax(-1) == 0).float().mean()


def _imbalance(routing):
    c = routing.expert_counts.float()
    return float(c.max() / c.mean())


def test_loss_free_balancing_reduces_load_imbalance_of_a_skewed_router():
    def skewed(loss_free):
        torch.manual_seed(0)
        r = TopKRouter(
            D_MODEL, NUM_EXPERTS, k=1, init_std=0.3, loss_free_balance=loss_free,
            bias_update_rate=0.01,
        )  # fmt: skip
        with torch.no_grad():
            r.weight[0] += 0.4
        return r

    plain, balanced = skewed(False).train(), skewed(True).train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(128, D_MODEL, generator=gen) + 0.5
        balanced(x)
    x = torch.randn(512, D_MODEL, generator=gen) + 0.5
    before, after = _imbalance(plain.eval()(x)), _imbalance(balanced.eval()(x))
    assert before > 2.0  # really skewed
    assert after < 1.5 and after < before - 0.5


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


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
