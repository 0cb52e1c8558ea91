"""EvoMoE's Dense-to-Sparse gate, COMET+ permutation local search and EvoMoE expert-diversify.

Oracles recompute everything from the module parameters with plain loops (``conftest``): the DTS
gate G from the router weight, the soft permutation with a probability-space Sinkhorn loop, the
expanded pairs per (token, inner pair, target expert).
"""

from __future__ import annotations

import itertools
import math

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
from xmoe.models.gpt import DenseFFN
from xmoe.moe.evo import diversify_experts, spawn_moe
from xmoe.moe.experts import Experts
from xmoe.routing import ROUTERS, HashRouter, TopKRouter
from xmoe.routing.dts import DenseToSparseRouter, anneal
from xmoe.routing.local_search import PermutationLocalSearch, hungarian_permutation, sinkhorn
from xmoe.train.trainer import notify_step

E = 6
N = 20


def _x(n=N, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


# --------------------------------------------------------------------------------------------
# DTS gate
# --------------------------------------------------------------------------------------------


def dts_reference(x, router, gumbel=None):
    """G = softmax((x W^T [+ gumbel]) / tau), per-token kept sets and pair weights (loops)."""
    logits = x.float() @ router.weight.float().T
    if gumbel is not None:
        logits = logits + gumbel
    g = torch.softmax(logits / float(router.tau), dim=-1)
    hard = router.hard_top1_after is not None and int(router.step) >= router.hard_top1_after
    kept = []
    for row in g.detach().tolist():
        best = max(range(len(row)), key=lambda e: (row[e], -e))
        sel = {best} if hard else {e for e, v in enumerate(row) if v >= router.drop_threshold}
        kept.append(sel | {best})
    return g, kept


def dts_weights(g, kept, token_idx, expert_idx, renormalize):
    ws = []
    for t, e in zip(token_idx.tolist(), expert_idx.tolist(), strict=True):
        w = g[t, e]
        if renormalize:
            w = w / sum(g[t, ee] for ee in kept[t])
        ws.append(w)
    return torch.stack(ws) if ws else g.new_zeros(0)


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_dts_active_counts_never_increase_as_tau_falls(schedule):
    router = DenseToSparseRouter(D_MODEL, 8, tau_start=4.0, tau_end=0.05, schedule=schedule)
    router.eval()
    x = _x(64)
    total = 24
    counts, taus = [], []
    with torch.no_grad():
        for step in range(total + 3):
            router.set_step(step, total)
            r = router(x)
            counts.append(_per_token(r))
            taus.append(float(r.extras["tau"]))
    assert all(a >= b for a, b in zip(taus, taus[1:]))  # tau falls monotonically
    for prev, cur in zip(counts, counts[1:]):
        assert bool((cur <= prev).all()), "a token gained experts while tau fell"
    assert bool((counts[-1] >= 1).all())
    assert counts[0].float().mean() > 6  # near-dense at tau 4
    assert counts[-1].float().mean() < 1.5  # near top-1 at tau 0.05


def test_dts_schedule_and_buffers_survive_state_dict():
    r = DenseToSparseRouter(D_MODEL, E, tau_start=2.0, tau_end=0.5, hard_top1_after=30)
    assert float(r.tau) == 2.0 and int(r.step) == 0
    r.set_step(5, 10)  # anneal over total_steps (anneal_steps=None)
    assert math.isclose(float(r.tau), 2.0 * 0.25**0.5, rel_tol=1e-6)
    r.set_step(50, 10)
    assert math.isclose(float(r.tau), 0.5, rel_tol=1e-6) and r.hard_top1
    lin = DenseToSparseRouter(D_MODEL, E, schedule="linear", anneal_steps=4)
    lin.set_step(1, 1000)
    assert math.isclose(float(lin.tau), 2.0 + (0.3 - 2.0) / 4, rel_tol=1e-6)
    assert math.isclose(anneal(3, 1.0, 0.1, 3), 0.1, rel_tol=1e-9)
    # a fresh router loading the state routes with the trained tau and the hard switch
    fresh = DenseToSparseRouter(D_MODEL, E, tau_start=2.0, tau_end=0.5, hard_top1_after=30)
    fresh.load_state_dict(r.state_dict())
    assert math.isclose(float(fresh.tau), 0.5, rel_tol=1e-6) and fresh.hard_top1
    fresh.eval()
    assert torch.equal(_per_token(fresh(_x())), torch.ones(N, dtype=torch.long))


@pytest.mark.parametrize("threshold", [0.0, 1e-3, 0.05, 0.2])
@pytest.mark.parametrize("renormalize", [False, True])
def test_dts_drop_threshold_respected(threshold, renormalize):
    router = DenseToSparseRouter(
        D_MODEL, E, drop_threshold=threshold, renormalize=renormalize, tau_start=0.7
    )
    router.eval()
    x = _x()
    r = router(x)
    g, kept = dts_reference(x, router)
    assert pair_set(r) == {(t, e) for t, sel in enumerate(kept) for e in sel}
    assert r.num_pairs == len(pair_set(r))
    assert bool((_per_token(r) >= 1).all())
    want = dts_weights(g, kept, r.token_idx, r.expert_idx, renormalize)
    torch.testing.assert_close(r.weight, want, atol=1e-6, rtol=0)
    dropped = [(t, e) for t in range(N) for e in range(E) if (t, e) not in pair_set(r)]
    assert all(float(g[t, e].detach()) < threshold for t, e in dropped)
    if renormalize:
        sums = torch.zeros(N).index_add(0, r.token_idx, r.weight)
        torch.testing.assert_close(sums, torch.ones(N))
    if threshold == 0.0:
        assert r.num_pairs == N * E


def test_dts_argmax_always_kept_even_above_any_threshold():
    router = DenseToSparseRouter(D_MODEL, E, drop_threshold=0.99, tau_start=50.0)
    router.eval()
    r = router(_x())
    assert torch.equal(_per_token(r), torch.ones(N, dtype=torch.long))
    g, _ = dts_reference(_x(), router)
    assert torch.equal(r.expert_idx[r.token_idx.argsort()], g.argmax(-1))


@pytest.mark.parametrize("training", [False, True])
def test_dts_hard_top1_after(training):
    router = DenseToSparseRouter(D_MODEL, E, tau_start=3.0, hard_top1_after=10)
    router.train(training)
    x = _x(64)
    router.set_step(9, 100)
    assert not router.hard_top1
    assert router(x).num_pairs > 64  # tau ~2.5: several experts per token
    router.set_step(10, 100)
    torch.manual_seed(3)
    r = router(x)
    assert router.hard_top1 and float(r.extras["hard_top1"]) == 1.0
    assert torch.equal(_per_token(r), torch.ones(64, dtype=torch.long))
    gumbel = None
    if training:
        torch.manual_seed(3)
        gumbel = _gumbel(64, E)
    g, _ = dts_reference(x, router, gumbel)
    order = r.token_idx.argsort()
    assert torch.equal(r.expert_idx[order], g.argmax(-1))
    torch.testing.assert_close(r.weight[order], g.max(-1).values, atol=1e-6, rtol=0)


def _gumbel(n, e):
    """Replays the router's draw: u = rand(n, e) clamped into (0, 1), g = -log(-log u)."""
    u = torch.rand(n, e).clamp(torch.finfo(torch.float32).tiny, 1 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def test_dts_gumbel_noise_only_in_training():
    router = DenseToSparseRouter(D_MODEL, E, tau_start=0.5)
    x = _x()
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.expert_idx, b.expert_idx)
    router.train()
    torch.manual_seed(1)
    c = router(x)
    torch.manual_seed(2)
    d = router(x)
    assert c.num_pairs != d.num_pairs or not torch.equal(c.weight, d.weight)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-noise-replayed"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(renormalize=True, drop_threshold=0.02),
        dict(hard_top1_after=0),
        dict(drop_threshold=0.1),
    ],
    ids=["default", "renorm-0.02", "hard-top1", "thr-0.1"],
)
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment"])
def test_dts_in_moe_matches_loop_oracle(cfg, backend, training):
    router = DenseToSparseRouter(D_MODEL, E, init_std=0.5, **cfg)
    moe = MoE(D_MODEL, E, D_EXPERT, router=router, backend=backend)
    moe.train(training)
    router.set_step(3, 10)  # an intermediate tau
    x = _x().requires_grad_(True)
    torch.manual_seed(11)
    y = moe(x)
    r = moe.last_routing
    gumbel = None
    if training:
        torch.manual_seed(11)
        gumbel = _gumbel(N, E)
    g, kept = dts_reference(x, router, gumbel)
    assert pair_set(r) == {(t, e) for t, sel in enumerate(kept) for e in sel}
    w = dts_weights(g, kept, r.token_idx, r.expert_idx, router.renormalize)
    torch.testing.assert_close(r.weight, w, atol=1e-6, rtol=0)
    y_ref = loop_oracle(x, r.token_idx, r.expert_idx, w, moe.experts)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    params = {"x": x, "router.weight": router.weight}
    params.update({f"experts.{k}": v for k, v in expert_params(moe).items()})
    grads = assert_grads_match(y, y_ref, params)
    assert grads["router.weight"].abs().sum() > 0
    assert set(r.losses) == {"load_balance", "z_loss"}


def test_dts_errors():
    bad = [
        dict(tau_start=0),
        dict(tau_start=float("inf")),
        dict(tau_end=-1.0),
        dict(schedule="cosine"),
        dict(anneal_steps=0),
        dict(hard_top1_after=-1),
        dict(drop_threshold=1.0),
        dict(drop_threshold=-0.1),
        dict(renormalize="yes"),
    ]
    for opts in bad:
        name = next(iter(opts))
        with pytest.raises(ValueError, match=name):
            DenseToSparseRouter(D_MODEL, E, **opts)
    r = DenseToSparseRouter(D_MODEL, E)
    with pytest.raises(ValueError, match="total_steps"):
        r.set_step(0, 0)
    with pytest.raises(ValueError, match="step"):
        r.set_step(-1, 10)


# --------------------------------------------------------------------------------------------
# COMET+ permutation local search
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# EvoMoE expert-diversify
# --------------------------------------------------------------------------------------------


def _trained_like_ffn(activation="gelu"):
    torch.manual_seed(3)
    return DenseFFN(D_MODEL, D_EXPERT, activation)


def _base_experts(activation="gelu", bias=True):
    torch.manual_seed(4)
    return Experts(1, D_MODEL, D_EXPERT, activation, bias, backend="loop")


@pytest.mark.parametrize("base_kind", ["ffn", "experts", "experts-swiglu", "experts-nobias"])
def test_diversify_with_zero_mask_copies_the_base(base_kind):
    if base_kind == "ffn":
        base = _trained_like_ffn()
        want = {"w1": base.fc.weight.T, "w2": base.proj.weight.T, "b1": base.fc.bias}
        want["b2"] = base.proj.bias
    else:
        act = "swiglu" if base_kind == "experts-swiglu" else "gelu"
        base = _base_experts(act, bias=base_kind != "experts-nobias")
        want = {n: p[0] for n, p in base.named_parameters()}
    out = diversify_experts(base, 5, mask_ratio=0.0)
    assert out.num_experts == 5
    assert {n for n, _ in out.named_parameters()} == set(want)
    for name, value in want.items():
        got = getattr(out, name)
        for e in range(5):
            assert torch.equal(got[e], value), name


@pytest.fixture
def dts_registered(monkeypatch):
    """``"dts"`` in the router registry (the package registers it; this keeps the test
    independent of that step)."""
    entry = ROUTERS.get("dts", (DenseToSparseRouter, "EvoMoE dense-to-sparse gate"))
    monkeypatch.setitem(ROUTERS, "dts", entry)


@pytest.mark.usefixtures("dts_registered")
@pytest.mark.parametrize("base_kind", ["ffn", "experts"])
@pytest.mark.parametrize(
    "router,opts",
    [
        ("dts", dict(renormalize=True, tau_start=1.0, init_std=0.5)),
        ("topk", dict(k=E, renormalize=True, init_std=0.5)),
        ("threshold", dict(threshold=0.5, renormalize=True)),
    ],
    ids=["dts-renorm", "topk-all-renorm", "threshold-renorm"],
)
def test_spawned_moe_with_zero_mask_reproduces_the_base(base_kind, router, opts):
    base = _trained_like_ffn() if base_kind == "ffn" else _base_experts()
    moe = spawn_moe(base, D_MODEL, E, router=router, mask_ratio=0.0, **opts)
    x = _x(32)
    for training in (False, True):
        moe.train(training)
        y = moe(x)
        assert moe.last_routing.num_pairs > 32  # several experts per token are mixed
        with torch.no_grad():
            want = base(x) if base_kind == "ffn" else expert_apply(base, 0, x)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("dts_registered")
def test_spawn_moe_builds_the_dts_gate_by_default():
    moe = spawn_moe(_trained_like_ffn("relu"), D_MODEL, 4, tau_start=1.5)
    assert isinstance(moe.router, DenseToSparseRouter) and float(moe.router.tau) == 1.5
    assert moe.experts.activation == "relu" and moe.d_expert == D_EXPERT


@pytest.mark.parametrize("mask_unit", ["weight", "hidden"])
def test_diversify_with_mask_makes_copies_differ(mask_unit):
    base = _base_experts("swiglu")
    out = diversify_experts(
        base, 4, mask_ratio=0.5, generator=torch.Generator().manual_seed(0), mask_unit=mask_unit
    )
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(out.w1[a], out.w1[b])
            assert not torch.equal(out.w2[a], out.w2[b])
    zeroed = (out.w1 == 0).float().mean()
    assert 0.4 < float(zeroed) < 0.6
    # kept entries are the base's, masked ones are zero
    kept = out.w1 != 0
    assert torch.equal(out.w1[kept], base.w1.expand_as(out.w1)[kept])
    if mask_unit == "hidden":
        dead = (out.w1 == 0).all(dim=1)  # [E, d_expert] hidden units with a zero column
        assert dead.sum(-1).tolist() == [D_EXPERT // 2] * 4
        assert torch.equal(dead, (out.w2 == 0).all(dim=2))
        assert torch.equal(dead, out.b1 == 0) and torch.equal(dead, (out.w3 == 0).all(dim=1))
        assert torch.equal(out.b2, base.b2.expand_as(out.b2))
    else:
        assert torch.equal(out.b1, base.b1.expand_as(out.b1))  # biases are not masked
    again = diversify_experts(
        base, 4, mask_ratio=0.5, generator=torch.Generator().manual_seed(0), mask_unit=mask_unit
    )
    assert torch.equal(again.w1, out.w1)  # reproducible with a seeded generator


def test_diversify_noise_only():
    base = _base_experts()
    out = diversify_experts(base, 3, mask_ratio=0.0, noise_std=0.01)
    assert not torch.equal(out.w1[0], out.w1[1])
    assert float((out.w1 - base.w1).abs().max().detach()) < 0.1


def test_diversify_errors():
    base = _base_experts()
    with pytest.raises(ValueError, match="num_experts=1"):
        diversify_experts(Experts(2, D_MODEL, D_EXPERT), 4)
    for kwargs, name in [
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(noise_std=-1.0), "noise_std"),
        (dict(mask_unit="row"), "mask_unit"),
        (dict(backend="cuda"), "backend"),
    ]:
        with pytest.raises(ValueError, match=name):
            diversify_experts(base, 4, **kwargs)
    with pytest.raises(ValueError, match="num_experts"):
        diversify_experts(base, 0)
    with pytest.raises(ValueError, match="dense FFN"):
        diversify_experts(torch.nn.Linear(4, 4), 4)
    tanh_ffn = _trained_like_ffn()
    tanh_ffn.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="activation"):
        diversify_experts(tanh_ffn, 4)
    assert diversify_experts(tanh_ffn, 2, activation="gelu").activation == "gelu"
    with pytest.raises(ValueError, match="d_model"):
        spawn_moe(base, D_MODEL + 4, 4)
