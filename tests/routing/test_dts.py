"""EvoMoE's Dense-to-Sparse gate (``xmoe.routing.dts``).

The oracle recomputes the gate G from the router weight with plain loops, and the layer output
and gradients with :func:`conftest.loop_oracle`.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import D_EXPERT, D_MODEL, assert_grads_match, expert_params, loop_oracle, pair_set
from xmoe import MoE
from xmoe.routing.dts import DenseToSparseRouter, anneal

E = 6


N = 20


def _x(n=N, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


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
