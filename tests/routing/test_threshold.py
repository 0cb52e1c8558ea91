"""Property tests (hypothesis) for the threshold rule, top-k selection and the router losses."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, dense_mixture, make_moe, reference_threshold, router_probs
from xmoe import ThresholdRouter, TopKRouter
from xmoe.routing import load_balance_loss, z_loss
from xmoe.routing.selection import threshold_keep

FAST = settings(max_examples=40, deadline=None)

logit_values = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def prob_matrices(draw, max_tokens=6, max_experts=8):
    """``[N, E]`` fp32 softmax probabilities from hypothesis-drawn logits (ties included)."""
    n = draw(st.integers(1, max_tokens))
    e = draw(st.integers(1, max_experts))
    rows = draw(st.lists(st.lists(logit_values, min_size=e, max_size=e), min_size=n, max_size=n))
    return torch.tensor(rows, dtype=torch.float32).softmax(-1)


thresholds = st.floats(0.01, 1.0, allow_nan=False, exclude_min=False)


def _sorted(probs):
    return probs.sort(dim=-1, descending=True, stable=True)


def _prefix_masses(sorted_row):
    out, acc = [0.0], 0.0
    for v in sorted_row:
        acc += v
        out.append(acc)
    return out  # out[r] = mass of ranks < r (float64)


def _away_from_boundary(sorted_probs, t, eps=1e-5):
    """Skip examples where a prefix mass is within fp32 rounding of t (the rule is exact there)."""
    if t >= 1.0:
        return True
    for row in sorted_probs.double().tolist():
        if any(abs(m - t) < eps for m in _prefix_masses(row)[1:]):
            return False
    return True


@FAST
@given(probs=prob_matrices(), t=thresholds)
def test_threshold_keep_is_minimal_prefix_reaching_t(probs, t):
    sp, _ = _sorted(probs)
    assume(_away_from_boundary(sp, t))
    keep = threshold_keep(sp, t)
    e = sp.shape[1]
    for row, krow in zip(sp.double().tolist(), keep.tolist(), strict=True):
        count = sum(krow)
        assert krow == [True] * count + [False] * (e - count), "keep set must be a prefix"
        assert count >= 1, "at least one expert per token"
        masses = _prefix_masses(row)
        if t >= 1.0:
            assert count == e
        else:
            # the kept prefix reaches t (or is everything) ...
            assert count == e or masses[count] >= t
            # ... and is minimal: one rank fewer does not reach t
            assert masses[count - 1] < t


@st.composite
def dyadic_rows(draw, denom=64, max_experts=8):
    """Probabilities ``c / denom`` with integer counts summing to ``denom`` (exact in fp32)."""
    e = draw(st.integers(1, max_experts))
    cuts = sorted(draw(st.lists(st.integers(0, denom), min_size=e - 1, max_size=e - 1)))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, denom], strict=True)]
    return sorted(counts, reverse=True)


@FAST
@given(counts=dyadic_rows(), j=st.integers(1, 64))
def test_threshold_keep_exact_boundary_mass_equal_to_t_stops_the_prefix(counts, j):
    # All sums are exact, so "reaches t" includes equality: once the kept mass == t, stop.
    sp = torch.tensor([counts], dtype=torch.float32) / 64
    t = j / 64
    keep = threshold_keep(sp, t)[0].tolist()
    expected, before = [], 0
    for c in counts:
        expected.append(t >= 1.0 or before < j)
        before += c
    assert keep == expected


def test_threshold_keep_stops_when_mass_exactly_reaches_t():
    sp = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert threshold_keep(sp, 0.5).tolist() == [[True, False, False, False]]
    assert threshold_keep(sp, 0.75).tolist() == [[True, True, False, False]]
    assert threshold_keep(sp, 0.7501).tolist() == [[True, True, True, False]]
    # t = 1 keeps even the zero-probability tail
    assert threshold_keep(sp, 1.0).tolist() == [[True, True, True, True]]


def test_threshold_router_breaks_probability_ties_by_lower_expert_index():
    router = ThresholdRouter(D_MODEL, 4, threshold=0.5)
    with torch.no_grad():
        router.weight.zero_()  # uniform p = 0.25: keep two experts, the lowest-indexed ones
    routing = router(torch.randn(3, D_MODEL))
    assert routing.token_idx.tolist() == [0, 0, 1, 1, 2, 2]
    assert routing.expert_idx.tolist() == [0, 1, 0, 1, 0, 1]
    assert routing.rank.tolist() == [0, 1, 0, 1, 0, 1]


@FAST
@given(probs=prob_matrices(), t=thresholds, data=st.data())
def test_threshold_max_experts_caps_the_prefix(probs, t, data):
    sp, _ = _sorted(probs)
    assume(_away_from_boundary(sp, t))
    e = sp.shape[1]
    cap = data.draw(st.integers(1, e))
    uncapped = threshold_keep(sp, t).sum(-1)
    capped = threshold_keep(sp, t, max_experts=cap).sum(-1)
    assert torch.equal(capped, uncapped.clamp(max=cap))
    assert bool((capped >= 1).all())


@FAST
@given(probs=prob_matrices(max_experts=6))
def test_threshold_one_keeps_every_expert_even_with_rounding(probs):
    sp, _ = _sorted(probs)
    assert bool(threshold_keep(sp, 1.0).all())


@FAST
@given(
    n=st.integers(1, 8),
    e=st.integers(1, 6),
    t=st.floats(0.05, 1.0),
    scale=st.sampled_from([0.02, 0.5, 3.0]),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_router_pairs_and_weights_match_reference(n, e, t, scale, renormalize, seed):
    gen = torch.Generator().manual_seed(seed)
    router = ThresholdRouter(D_MODEL, e, threshold=t, renormalize=renormalize, init_std=scale)
    x = torch.randn(n, D_MODEL, generator=gen)
    with torch.no_grad():
        router.weight.normal_(0, scale, generator=gen)
        p = router_probs(x, router)
    assume(_away_from_boundary(_sorted(p)[0], t))
    routing = router(x)
    selection = reference_threshold(p, t)
    expected = {(tok, ex): r for tok, sel in enumerate(selection) for ex, r in sel}
    got = dict(
        zip(
            zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True),
            routing.rank.tolist(),
            strict=True,
        )
    )
    assert got == expected
    per_token = torch.bincount(routing.token_idx, minlength=n)
    assert bool((per_token >= 1).all())
    if renormalize:
        sums = torch.zeros(n).index_add(0, routing.token_idx, routing.weight.detach())
        torch.testing.assert_close(sums, torch.ones(n), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(
            routing.weight.detach(), p[routing.token_idx, routing.expert_idx], atol=1e-6, rtol=0
        )
    torch.testing.assert_close(routing.score, p[routing.token_idx, routing.expert_idx])


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 10),
    e=st.integers(1, 6),
    activation=st.sampled_from(["gelu", "relu", "silu", "swiglu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_one_equals_full_soft_mixture(n, e, activation, bias, seed):
    torch.manual_seed(seed)
    moe = make_moe(
        num_experts=e, router="threshold", threshold=1.0, activation=activation, bias=bias
    )
    x = torch.randn(n, D_MODEL)
    y = moe(x)
    routing = moe.last_routing
    assert routing.num_pairs == n * e
    assert torch.equal(torch.bincount(routing.token_idx, minlength=n), torch.full((n,), e))
    with torch.no_grad():
        p = router_probs(x, moe.router)
        expected = dense_mixture(x, p, moe.experts)
    torch.testing.assert_close(y.detach(), expected, atol=1e-5, rtol=0)


@FAST
@given(
    n=st.integers(1, 8),
    e=st.integers(1, 8),
    data=st.data(),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_topk_gives_exactly_k_distinct_best_experts_per_token(n, e, data, renormalize, seed):
    k = data.draw(st.integers(1, e))
    gen = torch.Generator().manual_seed(seed)
    router = TopKRouter(D_MODEL, e, k=k, renormalize=renormalize, init_std=1.0)
    x = torch.randn(n, D_MODEL, generator=gen)
    routing = router(x)
    p = router_probs(x, router).detach()
    assert routing.num_pairs == n * k
    for tok in range(n):
        mine = routing.expert_idx[routing.token_idx == tok]
        assert len(set(mine.tolist())) == k
        # every chosen expert is at least as probable as every unchosen one
        chosen = torch.zeros(e, dtype=torch.bool)
        chosen[mine] = True
        if k < e:
            assert p[tok][chosen].min() >= p[tok][~chosen].max()
    if renormalize:
        sums = torch.zeros(n).index_add(0, routing.token_idx, routing.weight.detach())
        torch.testing.assert_close(sums, torch.ones(n), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(
            routing.weight.detach(), p[routing.token_idx, routing.expert_idx], atol=1e-6, rtol=0
        )


@FAST
@given(e=st.integers(1, 16), per_expert=st.integers(1, 5))
def test_load_balance_loss_is_one_under_uniform_load(e, per_expert):
    n = e * per_expert
    probs = torch.full((n, e), 1.0 / e)
    assigned = torch.arange(n) % e
    torch.testing.assert_close(load_balance_loss(probs, assigned), torch.tensor(1.0))


@FAST
@given(e=st.integers(1, 16), n=st.integers(1, 20), data=st.data())
def test_load_balance_loss_is_e_under_full_collapse(e, n, data):
    j = data.draw(st.integers(0, e - 1))
    probs = torch.zeros(n, e)
    probs[:, j] = 1.0
    assigned = torch.full((n,), j)
    torch.testing.assert_close(load_balance_loss(probs, assigned), torch.tensor(float(e)))


@FAST
@given(probs=prob_matrices(max_tokens=10))
def test_load_balance_loss_bounded_between_zero_and_e(probs):
    loss = float(load_balance_loss(probs, probs.argmax(-1)))
    e = probs.shape[1]
    assert 0.0 <= loss <= e + 1e-4


@FAST
@given(n=st.integers(1, 10), e=st.integers(1, 64))
def test_z_loss_of_zero_logits_is_log_e_squared(n, e):
    torch.testing.assert_close(z_loss(torch.zeros(n, e)), torch.tensor(math.log(e) ** 2))


@FAST
@given(n=st.integers(1, 6), e=st.integers(2, 6), shift=st.floats(-5, 5))
def test_z_loss_matches_logsumexp_definition(n, e, shift):
    logits = torch.randn(n, e) + shift
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / n
    torch.testing.assert_close(z_loss(logits), torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_router_reports_standard_losses():
    moe = make_moe(router="threshold", threshold=0.9)
    moe(torch.randn(8, D_MODEL))
    losses = moe.last_routing.losses
    assert set(losses) >= {"load_balance", "z_loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["load_balance"].requires_grad
