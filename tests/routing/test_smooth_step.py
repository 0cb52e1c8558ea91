"""The smooth-step, and the properties shared by the gates built on it (DSelect-k, COMET).

Each shared property is checked on both gates, against the loop references of
``smooth_step_oracles``; the layer check reuses :mod:`conftest`'s capacity reference and per-pair
loop oracle for the layer output and every gradient.
"""

from __future__ import annotations

import pytest
import torch
from smooth_step_oracles import (
    ROUTER_CLASSES,
    big_params,
    dense_from_routing,
    ref_comet,
    ref_dselect,
    ref_expert_weights,
)

from conftest import (
    D_MODEL,
    assert_grads_match,
    capacity_for,
    expert_params,
    loop_oracle,
    make_moe,
    pair_set,
    reference_capacity,
)
from xmoe.routing.comet import CometRouter
from xmoe.routing.dselect import DSelectKRouter
from xmoe.routing.smooth_step import smooth_step

N_TOKENS = 24


# --------------------------------------------------------------------------------------------
# Smooth-step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_boundaries_zero_and_formula(gamma):
    h = gamma / 2
    t = torch.tensor([-10 * gamma, -h, h, 10 * gamma, 0.0])
    assert smooth_step(t, gamma).tolist() == [0.0, 0.0, 1.0, 1.0, 0.5]
    inner = torch.linspace(-h, h, 101, dtype=torch.float64)[1:-1]
    want = -2 * inner**3 / gamma**3 + 3 * inner / (2 * gamma) + 0.5
    torch.testing.assert_close(smooth_step(inner, gamma), want, atol=1e-12, rtol=0)
    # continuity at the boundaries and symmetry S(-t) = 1 - S(t)
    eps = 1e-6 * gamma
    near = torch.tensor([-h + eps, h - eps], dtype=torch.float64)
    torch.testing.assert_close(
        smooth_step(near, gamma), torch.tensor([0.0, 1.0]).double(), atol=1e-9, rtol=0
    )
    t = torch.linspace(-gamma, gamma, 201, dtype=torch.float64)
    torch.testing.assert_close(
        smooth_step(-t, gamma), 1 - smooth_step(t, gamma), atol=1e-12, rtol=0
    )
    s = smooth_step(t, gamma)
    assert (s >= 0).all() and (s <= 1).all() and (s.diff() >= 0).all()


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_derivative(gamma):
    h = gamma / 2
    t = torch.tensor(
        [-2 * gamma, -h, -0.3 * gamma, 0.0, 0.2 * gamma, h, 2 * gamma], dtype=torch.float64
    )
    t.requires_grad_(True)
    (grad,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    want = torch.where(t.abs() < h, -6 * t**2 / gamma**3 + 3 / (2 * gamma), torch.zeros_like(t))
    torch.testing.assert_close(grad, want.detach(), atol=1e-12, rtol=0)
    assert grad[3].item() == pytest.approx(1.5 / gamma)
    # the derivative is continuous: the cubic's slope vanishes at the boundaries
    edge = torch.tensor(
        [-h + 1e-7 * gamma, h - 1e-7 * gamma], dtype=torch.float64, requires_grad=True
    )
    (g_edge,) = torch.autograd.grad(smooth_step(edge, gamma).sum(), edge)
    assert g_edge.abs().max() < 1e-5


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_smooth_step_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        smooth_step(torch.zeros(3), gamma)


# --------------------------------------------------------------------------------------------
# Gate properties (both gates)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize("num_experts,k", [(2, 1), (4, 2), (8, 3), (16, 2)])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_weights_sum_to_one_for_power_of_two(name, num_experts, k, scale):
    router = ROUTER_CLASSES[name](D_MODEL, num_experts, k=k)
    if scale is not None:
        big_params(router, scale)
    x = torch.randn(64, D_MODEL)
    routing = router(x)
    w = dense_from_routing(routing)
    torch.testing.assert_close(w.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
    assert (routing.weight > 0).all()
    assert routing.losses["nonexistent_mass"].item() == 0.0
    # pairs are exactly the positive entries of the router's own dense gate
    dense = router.gate(x)[0][:, :num_experts]
    assert torch.equal(w, dense.detach())
    assert routing.num_pairs == int((dense > 0).sum())


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize("num_experts,k", [(4, 2), (8, 3), (5, 2), (16, 4)])
def test_at_most_k_experts_when_binary(name, num_experts, k):
    # gamma tiny and O(1) weights: every |z| >> gamma/2, so every smooth-step is exactly 0 or 1.
    router = ROUTER_CLASSES[name](D_MODEL, num_experts, k=k, gamma=1e-4, init_scale=1.0)
    x = torch.randn(64, D_MODEL)
    routing = router(x)
    assert routing.extras["binary_fraction"].item() == 1.0  # precondition: all bits binary
    counts = torch.bincount(routing.token_idx, minlength=64)
    assert counts.max() <= k
    assert (routing.weight > 0).all()
    assert routing.losses["entropy"].item() == 0.0
    w = dense_from_routing(routing)
    if name == "dselect":
        lost = ref_dselect(router, x)
        lost = torch.tensor(
            [sum(float(v.detach()) for c, v in r.items() if c >= num_experts) for r in lost]
        )
        torch.testing.assert_close(w.sum(-1) + lost, torch.ones(64), atol=1e-6, rtol=0)
    else:  # every tree on a real leaf here, or the token's trees all dead (no pairs)
        sums = w.sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-6) | (sums == 0))
    if num_experts & (num_experts - 1) == 0:
        torch.testing.assert_close(w.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
    # the binary gate really is sparse (not vacuous)
    assert counts.float().mean() < min(k, num_experts)


def _ref_entropy(dists) -> torch.Tensor:
    """Sum over distributions of ``-sum p log p`` (0 log 0 = 0)."""
    total = torch.zeros(())
    for dist in dists:
        for p in dist:
            if float(p.detach()) > 0:
                total = total - p * torch.log(p)
    return total


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize("num_experts,k", [(4, 2), (5, 2), (8, 3)])
def test_losses_and_their_gradients_match_oracle(name, num_experts, k):
    router = ROUTER_CLASSES[name](D_MODEL, num_experts, k=k)
    big_params(router, 0.5)
    x = torch.randn(12, D_MODEL)
    losses = router(x).losses
    if name == "dselect":
        per_token = ref_dselect(router, x, with_selectors=True)
        ent = [_ref_entropy(sel) for _, sel in per_token]
        lost = [sum(r[c] for r in sel for c in range(num_experts, len(r))) for _, sel in per_token]
    else:
        per_token = [paths for _, paths in ref_comet(router, x)]
        leaves = 2**router.depth
        ent = [
            _ref_entropy([[p[(i, leaf)] for leaf in range(leaves)] for i in range(k)])
            for p in per_token
        ]
        lost = [
            sum(p[(i, leaf)] for i in range(k) for leaf in range(num_experts, leaves))
            for p in per_token
        ]
    want = {
        "entropy": torch.stack(ent).mean(),
        "nonexistent_mass": torch.stack(
            [torch.as_tensor(v, dtype=torch.float32) for v in lost]
        ).mean(),
    }
    assert set(losses) == set(want)
    params = list(router.parameters())
    for key, value in want.items():
        torch.testing.assert_close(losses[key], value, atol=1e-5, rtol=1e-5)
        if value.requires_grad:
            got = torch.autograd.grad(losses[key], params, retain_graph=True, allow_unused=True)
            ref = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            for g, r in zip(got, ref, strict=True):
                g = torch.zeros(()) if g is None else g
                r = torch.zeros(()) if r is None else r
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert losses["entropy"] > 0
    assert (losses["nonexistent_mass"] > 0) == (num_experts & (num_experts - 1) != 0)


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
def test_rank_orders_kept_experts_by_weight(name):
    router = ROUTER_CLASSES[name](D_MODEL, 8, k=3)
    big_params(router, 0.5)
    routing = router(torch.randn(32, D_MODEL))
    for t in range(32):
        sel = routing.token_idx == t
        ranks, w = routing.rank[sel], routing.weight[sel].detach()
        order = ranks.argsort()
        assert ranks[order].tolist() == list(range(int(sel.sum())))
        assert (w[order].diff() <= 0).all()
        assert torch.equal(routing.score[sel], w)
    assert not routing.score.requires_grad


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize("num_experts", [5, 8])
def test_all_losses_and_gradients_finite_with_saturated_bits(name, num_experts):
    router = ROUTER_CLASSES[name](D_MODEL, num_experts, k=2)
    big_params(router, 1.0)  # many smooth-steps exactly 0 / 1: zero weights, log(0) paths
    x = torch.randn(32, D_MODEL, requires_grad=True)
    routing = router(x)
    assert routing.num_pairs < 32 * num_experts  # some zeros
    loss = (routing.weight * torch.randn(routing.num_pairs)).sum() + sum(routing.losses.values())
    grads = torch.autograd.grad(loss, [x, *router.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
def test_single_expert(name):
    router = ROUTER_CLASSES[name](D_MODEL, 1, k=1)
    routing = router(torch.randn(5, D_MODEL))
    assert routing.expert_idx.tolist() == [0] * 5
    torch.testing.assert_close(routing.weight, torch.ones(5), atol=1e-6, rtol=0)
    assert routing.losses["entropy"].item() == 0.0


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
def test_empty_input(name):
    router = ROUTER_CLASSES[name](D_MODEL, 4)
    routing = router(torch.zeros(0, D_MODEL))
    assert routing.num_pairs == 0
    assert all(v.item() == 0.0 for v in routing.losses.values())


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
def test_fp32_under_autocast(name):
    router = ROUTER_CLASSES[name](D_MODEL, 4)
    big_params(router, 0.5)
    x = torch.randn(16, D_MODEL)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.weight.dtype == torch.float32
    assert pair_set(got) == pair_set(ref)
    torch.testing.assert_close(got.weight, ref.weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(name, bad):
    router = ROUTER_CLASSES[name](D_MODEL, 4)
    x = torch.randn(4, D_MODEL)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        router(x)


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=5), r"k must be an integer \[1, 4\]"),
        (dict(k=1.5), "k must be"),
        (dict(k=True), "k must be"),
        (dict(gamma=0.0), "gamma must be"),
        (dict(gamma=-1.0), "gamma must be"),
        (dict(gamma=float("nan")), "gamma must be"),
        (dict(gamma=float("inf")), "gamma must be"),
        (dict(init_scale=0.0), "init_scale must be"),
        (dict(init_scale=-0.1), "init_scale must be"),
        (dict(init_scale=float("nan")), "init_scale must be"),
    ],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        ROUTER_CLASSES[name](D_MODEL, 4, **options)


@pytest.mark.parametrize("name", list(ROUTER_CLASSES))
def test_bad_sizes_raise(name):
    cls = ROUTER_CLASSES[name]
    with pytest.raises(ValueError, match="d_model"):
        cls(0, 4)
    with pytest.raises(ValueError, match="num_experts"):
        cls(D_MODEL, 0)
    with pytest.raises(ValueError, match="k must be"):
        cls(D_MODEL, 1)  # default k=2 > E=1


def test_bad_secondary_init_scales_raise():
    with pytest.raises(ValueError, match="init_scale"):
        DSelectKRouter(D_MODEL, 4, alpha_init_scale=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        CometRouter(D_MODEL, 4, leaf_init_scale=-1.0)


def test_default_init_scale_follows_gamma():
    r = DSelectKRouter(D_MODEL, 8, gamma=2.0)
    assert r.init_scale == pytest.approx(0.02)
    assert r.z_weight.abs().max() <= 0.02
    c = CometRouter(D_MODEL, 8, gamma=2.0)
    assert c.node_weight.abs().max() <= 0.02
    # fractional start: no smooth-step saturated for unit-scale inputs
    assert r(torch.randn(16, D_MODEL)).extras["binary_fraction"].item() == 0.0


# --------------------------------------------------------------------------------------------
# Loop oracle through the MoE layer
# --------------------------------------------------------------------------------------------


ORACLE_CASES = {
    "dselect-E4-k2": (DSelectKRouter, 4, dict(k=2)),
    "dselect-E6-k2-g2": (DSelectKRouter, 6, dict(k=2, gamma=2.0)),
    "comet-E4-k2": (CometRouter, 4, dict(k=2)),
    "comet-E5-k3-g2": (CometRouter, 5, dict(k=3, gamma=2.0)),
}


AMBIGUOUS = 1e-6  # oracle weights in (0, this) could round to 0 on one side only


def _check_against_oracle(moe, x, atol=1e-5):
    router = moe.router
    x = x.clone().requires_grad_(True)
    y = moe(x)
    routing = moe.last_routing
    n, num_e = x.shape[0], moe.num_experts

    ref = ref_expert_weights(router, x)
    dense = torch.zeros(n, num_e, dtype=torch.float64)
    for t, row in enumerate(ref):
        for e, w in row.items():
            dense[t, e] = float(w.detach())
    ambiguous = (dense > 0) & (dense < AMBIGUOUS)
    assert not ambiguous.any(), "test data precondition: an oracle weight is within rounding of 0"

    # -- routing decisions: candidates are the oracle's positive weights, ranked by weight -----
    selection = []
    for t in range(n):
        order = sorted(
            (e for e in range(num_e) if dense[t, e] > 0), key=lambda e: (-dense[t, e], e)
        )
        selection.append([(e, r) for r, e in enumerate(order)])
    cf = moe.capacity_factor if moe.training else moe.eval_capacity_factor
    capacity = capacity_for(cf, n, num_e)
    expected = reference_capacity(selection, dense, capacity, num_e)
    assert pair_set(routing) == expected
    assert routing.num_pairs == len(expected)
    assert routing.num_selected == sum(len(s) for s in selection)
    assert (routing.weight > 0).all()  # zero weights never become pairs
    ranks = {(t, e): r for t, sel in enumerate(selection) for e, r in sel}
    got_ranks = zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.rank.tolist())
    assert all(ranks[(t, e)] == r for t, e, r in got_ranks)

    # -- forward ---------------------------------------------------------------------------
    pairs = list(zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True))
    weights = torch.stack([ref[t][e] for t, e in pairs]) if pairs else x.new_zeros(0)
    torch.testing.assert_close(routing.weight, weights, atol=1e-6, rtol=0)
    y_ref = loop_oracle(x, routing.token_idx, routing.expert_idx, weights, moe.experts)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)

    # -- backward: x, every router parameter, every expert parameter -------------------------
    params = {"x": x}
    params.update({f"router.{k}": v for k, v in router.named_parameters()})
    params.update({f"experts.{k}": v for k, v in expert_params(moe).items()})
    grads = assert_grads_match(y, y_ref, params, atol)
    # not vacuous: every router parameter receives gradient
    for name, want in grads.items():
        if name.startswith("router."):
            assert want.abs().sum() > 0, name
    return routing, dense


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment"])
@pytest.mark.parametrize("cf", [None, 1.0], ids=["dropless", "cf1.0"])
@pytest.mark.parametrize("case", list(ORACLE_CASES.values()), ids=list(ORACLE_CASES))
def test_layer_matches_loop_oracle(case, cf, backend):
    cls, num_experts, options = case
    router = cls(D_MODEL, num_experts, **options)
    big_params(router, 0.5 * options.get("gamma", 1.0))  # a mix of binary and fractional bits
    moe = make_moe(num_experts=num_experts, router=router, capacity_factor=cf, backend=backend)
    moe.train()
    routing, dense = _check_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))
    # the case exercises both exact zeros and several experts per token
    per_token = (dense > 0).sum(-1)
    assert per_token.min() < num_experts and per_token.max() > 1
    if cf is not None:
        assert routing.dropped_fraction > 0
