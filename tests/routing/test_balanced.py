"""BASE layers: the balanced assignment solvers (``xmoe.routing.assignment``) and the router
(``xmoe.routing.balanced``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS
from xmoe.routing import BalancedAssignmentRouter
from xmoe.routing.assignment import balanced_assignment

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


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
