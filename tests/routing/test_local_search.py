"""COMET+ permutation local search (``xmoe.routing.local_search``).

The oracle recomputes the soft permutation with a probability-space Sinkhorn loop and the expanded
pairs per (token, inner pair, target expert).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from conftest import (
    D_EXPERT,
    D_MODEL,
    assert_grads_match,
    expert_apply,
    expert_params,
    loop_oracle,
    pair_set,
)
from xmoe import MoE
from xmoe.routing import HashRouter, TopKRouter
from xmoe.routing.dts import DenseToSparseRouter
from xmoe.routing.local_search import PermutationLocalSearch, hungarian_permutation, sinkhorn
from xmoe.train.loop import notify_step

E = 6


N = 20


def _x(n=N, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


def _gumbel(n, e):
    """Replays the router's draw: u = rand(n, e) clamped into (0, 1), g = -log(-log u)."""
    u = torch.rand(n, e).clamp(torch.finfo(torch.float32).tiny, 1 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def sinkhorn_reference(scores, iters):
    """Probability-space Sinkhorn: alternately divide rows and columns of exp(scores) by sums."""
    p = torch.exp(scores - scores.max())
    for _ in range(iters):
        p = p / p.sum(dim=1, keepdim=True)
        p = p / p.sum(dim=0, keepdim=True)
    return p


def test_sinkhorn_is_doubly_stochastic():
    scores = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    p = sinkhorn(scores, 50)
    torch.testing.assert_close(p.sum(0), torch.ones(5))
    torch.testing.assert_close(p.sum(1), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, sinkhorn_reference(scores, 50), atol=1e-6, rtol=0)
    batched = sinkhorn(torch.stack([scores, scores.T]), 50)
    torch.testing.assert_close(batched[1], sinkhorn(scores.T, 50))


@pytest.mark.parametrize("seed", range(5))
def test_sinkhorn_low_tau_is_the_hungarian_permutation(seed):
    L = torch.randn(E, E, generator=torch.Generator().manual_seed(seed))
    # "low" is relative to the gap between the best and the second-best assignment of L
    perms = torch.tensor(list(itertools.permutations(range(E))))
    values = L[torch.arange(E), perms].sum(-1).sort(descending=True).values
    tau = float(values[0] - values[1]) / 30
    p = sinkhorn(L.double() / tau, 2000)
    one_hot = F.one_hot(p.argmax(-1), E).double()
    torch.testing.assert_close(p, one_hot, atol=1e-2, rtol=0)  # a permutation matrix
    assert sorted(p.argmax(-1).tolist()) == list(range(E))
    rows, cols = linear_sum_assignment(L.numpy(), maximize=True)
    assert p.argmax(-1).tolist() == cols[rows.argsort()].tolist()
    ls = PermutationLocalSearch(TopKRouter(D_MODEL, E))
    with torch.no_grad():
        ls.perm_logits.copy_(L)
    assert ls.freeze().tolist() == cols[rows.argsort()].tolist()
    assert hungarian_permutation(L).tolist() == cols[rows.argsort()].tolist()


def _wrapped_moe(backend="loop", seed=0, **opts):
    torch.manual_seed(seed)
    inner = TopKRouter(D_MODEL, E, k=2, init_std=0.5)
    ls = PermutationLocalSearch(inner, **opts)
    with torch.no_grad():
        ls.perm_logits.normal_(std=1.0)
    return MoE(D_MODEL, E, D_EXPERT, router=ls, backend=backend)


def soft_oracle(x, moe, gumbel=None):
    """Expanded pairs: for every inner top-k pair (t, e, p_te) and every target e' kept in row
    P[e] (P > threshold, or the row argmax), one term p_te * P[e, e'] * expert_e'(x_t)."""
    ls = moe.router
    probs = torch.softmax(x.float() @ ls.inner.weight.float().T, dim=-1)
    scores = ls.perm_logits.float() if gumbel is None else ls.perm_logits.float() + gumbel
    p = sinkhorn_reference(scores / float(ls.tau), ls.sinkhorn_iters)
    rows = []
    expanded = set()
    for t in range(x.shape[0]):
        row = probs[t].detach().tolist()
        top = sorted(range(E), key=lambda e: (-row[e], e))[: ls.inner.k]
        out = x.new_zeros(D_MODEL)
        for e in top:
            best = int(p[e].argmax())
            for e2 in range(E):
                if float(p[e, e2].detach()) > ls.prune_threshold or e2 == best:
                    out = out + probs[t, e] * p[e, e2] * expert_apply(moe.experts, e2, x[t])
                    expanded.add((t, e2))
        rows.append(out)
    return torch.stack(rows), expanded


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-noise-replayed"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment"])
def test_local_search_soft_matches_loop_oracle(backend, training):
    moe = _wrapped_moe(backend, tau_start=0.7)
    moe.train(training)
    ls = moe.router
    x = _x().requires_grad_(True)
    torch.manual_seed(5)
    y = moe(x)
    r = moe.last_routing
    gumbel = None
    if training:
        torch.manual_seed(5)
        gumbel = _gumbel(E, E)
    y_ref, expanded = soft_oracle(x, moe, gumbel)
    assert pair_set(r) == expanded
    assert r.num_pairs == len(expanded)  # duplicates (t, e') merged
    assert r.num_pairs > 2 * N  # the soft permutation really expands the pairs
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    params = {"x": x, "inner.weight": ls.inner.weight, "L": ls.perm_logits}
    params.update({f"experts.{k}": v for k, v in expert_params(moe).items()})
    grads = assert_grads_match(y, y_ref, params)
    assert grads["L"].abs().sum() > 0  # L learns while soft
    # ranks: 0..(pairs of the token - 1), by descending weight
    for t in range(N):
        sel = r.token_idx == t
        w, rk = r.weight[sel].detach(), r.rank[sel]
        assert sorted(rk.tolist()) == list(range(int(sel.sum())))
        assert torch.equal(w[rk.argsort()], w.sort(descending=True).values)


def test_local_search_frozen_is_inner_routing_remapped():
    moe = _wrapped_moe()
    ls = moe.router
    moe.eval()
    ls.set_step(0, 100)
    assert not ls.is_frozen
    ls.set_step(ls.search_steps(100), 100)
    assert ls.is_frozen
    rows, cols = linear_sum_assignment(ls.perm_logits.detach().numpy(), maximize=True)
    assert ls.perm.tolist() == cols[rows.argsort()].tolist()
    assert ls.perm.tolist() != list(range(E))  # a non-trivial permutation for this seed
    x = _x().requires_grad_(True)
    y = moe(x)
    r = moe.last_routing
    inner = ls.inner(x)
    assert torch.equal(r.token_idx, inner.token_idx)
    assert torch.equal(r.expert_idx, ls.perm[inner.expert_idx])
    assert torch.equal(r.weight, inner.weight) and torch.equal(r.rank, inner.rank)
    assert float(r.extras["perm_frozen"]) == 1.0
    y_ref = loop_oracle(x, inner.token_idx, ls.perm[inner.expert_idx], inner.weight, moe.experts)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    (y.square().sum()).backward()
    assert ls.perm_logits.grad is None  # no longer part of the graph
    # the frozen state survives a state_dict round trip
    fresh = PermutationLocalSearch(TopKRouter(D_MODEL, E, k=2))
    fresh.load_state_dict(ls.state_dict())
    assert fresh.is_frozen and torch.equal(fresh.perm, ls.perm)


def test_local_search_training_continues_with_frozen_permutation():
    moe = _wrapped_moe(search_fraction=0.3)
    ls = moe.router
    moe.train()
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    x, target = _x(32, seed=1), _x(32, seed=2)
    total = 10
    history = []
    for step in range(total):
        notify_step(moe, step, total)  # the trainer's step callback
        loss = F.mse_loss(moe(x), target) + 0.01 * moe.last_routing.losses["load_balance"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        history.append((ls.is_frozen, ls.perm_logits.detach().clone(), float(ls.tau)))
    search = ls.search_steps(total)
    assert search == 3
    assert [f for f, _, _ in history] == [False] * search + [True] * (total - search)
    assert history[1][2] < history[0][2]  # tau annealed during the search
    assert not torch.equal(history[0][1], history[search - 1][1])  # L learned while soft
    frozen_L = history[search][1]
    assert all(torch.equal(L, frozen_L) for _, L, _ in history[search:])  # then untouched
    assert ls.perm.tolist() == hungarian_permutation(history[search - 1][1]).tolist()
    w_before = moe.experts.w1.detach().clone()
    notify_step(moe, total, total + 5)
    F.mse_loss(moe(x), target).backward()
    opt.step()
    assert not torch.equal(moe.experts.w1, w_before)  # the model still trains


def test_local_search_wraps_any_router_and_forwards_kwargs():
    inner = HashRouter(D_MODEL, E, vocab_size=50)
    ls = PermutationLocalSearch(inner, tau_start=0.2)
    assert ls.uses_token_ids and ls.num_experts == E
    assert ls.fit_frequencies == inner.fit_frequencies
    ids = torch.randint(0, 50, (N,))
    ls.eval()
    r = ls(_x(), token_ids=ids)
    assert r.num_tokens == N and bool((_per_token(r) >= 1).all())
    ls.freeze()
    r2, ri = ls(_x(), token_ids=ids), inner(_x(), token_ids=ids)
    assert torch.equal(r2.expert_idx, ls.perm[ri.expert_idx])
    dts = PermutationLocalSearch(DenseToSparseRouter(D_MODEL, E))
    assert dts.default_loss_coefs == DenseToSparseRouter.default_loss_coefs
    assert set(dts(_x()).losses) == {"load_balance", "z_loss"}


def test_local_search_identity_init_and_errors():
    ls = PermutationLocalSearch(TopKRouter(D_MODEL, E), tau_start=0.05)
    ls.eval()
    torch.testing.assert_close(ls.soft_permutation(), torch.eye(E), atol=1e-6, rtol=0)
    uni = PermutationLocalSearch(TopKRouter(D_MODEL, E), init="uniform")
    torch.testing.assert_close(uni.eval().soft_permutation(), torch.full((E, E), 1 / E))
    inner = TopKRouter(D_MODEL, E)
    bad = [
        dict(search_fraction=0.0),
        dict(search_fraction=1.5),
        dict(tau_start=0.0),
        dict(tau_end=2.0),
        dict(sinkhorn_iters=0),
        dict(prune_threshold=1.0),
        dict(init="random"),
        dict(init_scale=-1.0),
        dict(noise=1),
    ]
    for opts in bad:
        name = next(iter(opts))
        with pytest.raises(ValueError, match=name):
            PermutationLocalSearch(inner, **opts)
    with pytest.raises(ValueError, match="inner"):
        PermutationLocalSearch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown local search option.*'temperature'"):
        PermutationLocalSearch(inner, temperature=1.0)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(torch.zeros(3, 3), 0)
    with pytest.raises(ValueError, match="log_alpha"):
        sinkhorn(torch.zeros(3, 4), 5)
