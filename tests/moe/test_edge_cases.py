"""Edge cases of the MoE layer: empty experts, collapse, tiny/empty inputs, eval invariance, dtypes,
capacity drops."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    D_MODEL,
    NUM_EXPERTS,
    expert_params,
    loop_oracle,
    make_moe,
    router_probs,
)

BACKENDS = ["loop", "grouped_mm", "segment", "native"]


def _steer_router(moe, favour, scale=10.0):
    """Make feature 0 a constant-1 "bias" feature and give ``favour[e]`` as expert e's logit."""
    with torch.no_grad():
        moe.router.weight.mul_(0.1)
        moe.router.weight[:, 0] = torch.tensor(favour, dtype=torch.float32) * scale


def _inputs(n, *leading):
    x = torch.randn(*leading, n, D_MODEL)
    x[..., 0] = 1.0
    return x


def _oracle(moe, x):
    r = moe.last_routing
    return loop_oracle(x.reshape(-1, D_MODEL), r.token_idx, r.expert_idx, r.weight, moe.experts)


# --------------------------------------------------------------------------------------------
# Degenerate expert loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "router_cfg",
    [dict(router="topk", k=2), dict(router="threshold", threshold=0.9)],
    ids=["topk2", "threshold0.9"],
)
def test_expert_with_no_tokens_gets_zero_gradient_and_output_is_correct(router_cfg, backend):
    moe = make_moe(backend=backend, **router_cfg)
    _steer_router(moe, [1.0, 1.0, 1.0, -5.0])  # expert 3 is never selected
    x = _inputs(20).requires_grad_(True)
    y = moe(x)
    counts = moe.last_routing.expert_counts
    assert counts[3] == 0 and bool((counts[:3] > 0).all())
    torch.testing.assert_close(y, _oracle(moe, x), atol=1e-5, rtol=0)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in expert_params(moe).items():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad[3]) == 0, f"{name}[3] must get no gradient"
        assert torch.count_nonzero(p.grad[:3]) > 0, f"{name}[:3] must get gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_routed_to_one_expert(backend):
    moe = make_moe(router="topk", k=1, backend=backend)
    _steer_router(moe, [0.0, 0.0, 10.0, 0.0])
    x = _inputs(17).requires_grad_(True)
    y = moe(x)
    r = moe.last_routing
    assert r.expert_counts.tolist() == [0, 0, 17, 0]
    torch.testing.assert_close(y, _oracle(moe, x), atol=1e-5, rtol=0)
    y.sum().backward()
    assert torch.count_nonzero(moe.experts.w1.grad[[0, 1, 3]]) == 0
    assert torch.count_nonzero(moe.experts.w1.grad[2]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    moe = make_moe(router="threshold", threshold=0.7, backend=backend)
    x = torch.randn(1, D_MODEL, requires_grad=True)
    y = moe(x)
    assert y.shape == (1, D_MODEL)
    torch.testing.assert_close(y, _oracle(moe, x), atol=1e-5, rtol=0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cf", [None, 1.0])
def test_empty_input_returns_empty_output_and_backprops(backend, cf):
    moe = make_moe(router="threshold", backend=backend, capacity_factor=cf)
    x = torch.randn(0, D_MODEL, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, D_MODEL)
    assert moe.last_routing.num_pairs == 0
    assert moe.last_routing.dropped_fraction == 0.0
    (y.sum() + sum(moe.last_routing.losses.values())).backward()
    assert x.grad.shape == (0, D_MODEL)
    for p in expert_params(moe).values():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_empty_input_with_leading_dims():
    moe = make_moe()
    y = moe(torch.randn(2, 0, D_MODEL))
    assert y.shape == (2, 0, D_MODEL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_are_preserved_and_flattened_consistently(backend):
    moe = make_moe(router="topk", k=2, backend=backend)
    x = torch.randn(3, 5, D_MODEL)
    y = moe(x)
    assert y.shape == (3, 5, D_MODEL)
    assert moe.last_routing.num_tokens == 15
    y_flat = moe(x.reshape(15, D_MODEL))
    torch.testing.assert_close(y.reshape(15, D_MODEL), y_flat, atol=1e-6, rtol=0)


def test_one_dimensional_input_is_a_single_token():
    moe = make_moe()
    x = torch.randn(D_MODEL)
    y = moe(x)
    assert y.shape == (D_MODEL,)
    torch.testing.assert_close(y, moe(x[None])[0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Eval-mode batch invariance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "router_cfg",
    [
        dict(router="threshold", threshold=0.8),
        dict(router="topk", k=2, noisy=True),
        dict(router="topk", k=1),
    ],
    ids=["threshold", "noisy-topk2", "topk1"],
)
def test_eval_output_of_a_token_does_not_depend_on_its_batch(router_cfg, backend):
    moe = make_moe(capacity_factor=0.25, backend=backend, **router_cfg)  # train-only capacity
    moe.eval()
    x = torch.randn(32, D_MODEL)
    with torch.no_grad():
        batch = moe(x)
        alone = torch.cat([moe(x[i : i + 1]) for i in range(len(x))])
        perm = torch.randperm(len(x))
        shuffled = moe(x[perm])
        halves = torch.cat([moe(x[:7]), moe(x[7:])])
    torch.testing.assert_close(alone, batch, atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled, batch[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(halves, batch, atol=1e-6, rtol=0)


def test_eval_capacity_factor_may_make_output_batch_dependent():
    moe = make_moe(router="topk", k=1, eval_capacity_factor=1.0)
    _steer_router(moe, [5.0, 0.0, 0.0, 0.0])  # everyone wants expert 0
    moe.eval()
    x = _inputs(16)
    with torch.no_grad():
        batch = moe(x)
        kept = set(moe.last_routing.token_idx.tolist())
        dropped = [t for t in range(16) if t not in kept]
        assert dropped, "capacity 4 on 16 tokens must drop some"
        t = dropped[0]
        alone = moe(x[t : t + 1])
    assert torch.count_nonzero(batch[t]) == 0
    assert torch.count_nonzero(alone) > 0  # alone, the token fits: output differs from in-batch
    # default (no eval capacity) is invariant for the same token
    moe.eval_capacity_factor = None
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[t : t + 1], moe(x[t : t + 1]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Init, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_are_initialised_independently(activation):
    moe = make_moe(activation=activation)
    for name, p in expert_params(moe).items():
        for i in range(NUM_EXPERTS):
            for j in range(i + 1, NUM_EXPERTS):
                assert not torch.equal(p[i], p[j]), f"{name}[{i}] == {name}[{j}]"
        assert p.std() > 0


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_router_scores_stay_fp32_under_bf16_autocast(backend, x_dtype):
    moe = make_moe(router="threshold", threshold=0.8, backend=backend)
    x = torch.randn(12, D_MODEL).to(x_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    r = moe.last_routing
    assert r.weight.dtype == torch.float32
    assert r.score.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in r.losses.values())
    assert y.dtype == x_dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    # routing decisions are the fp32 ones
    with torch.no_grad():
        p = router_probs(x.float(), moe.router)
    torch.testing.assert_close(r.score, p[r.token_idx, r.expert_idx], atol=1e-6, rtol=0)
    # and the bf16 expert output is close to the fp32 oracle
    ref = loop_oracle(x.detach().float(), r.token_idx, r.expert_idx, r.weight, moe.experts)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert moe.router.weight.grad is not None and moe.experts.w1.grad is not None


# --------------------------------------------------------------------------------------------
# Capacity drops
# --------------------------------------------------------------------------------------------


def test_dropped_fraction_zero_when_dropless_and_positive_with_tiny_capacity():
    x = torch.randn(40, D_MODEL)
    moe = make_moe(router="topk", k=2)
    moe(x)
    assert moe.last_routing.dropped_fraction == 0.0
    assert moe.last_routing.num_selected == 80
    moe.capacity_factor = 0.1  # C = ceil(0.1 * 40 / 4) = 1
    moe(x)
    r = moe.last_routing
    assert r.num_selected == 80
    assert r.num_pairs <= NUM_EXPERTS
    assert r.dropped_fraction == pytest.approx(1 - r.num_pairs / 80)
    assert r.dropped_fraction > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_with_all_pairs_dropped_outputs_exactly_zero(backend):
    moe = make_moe(router="threshold", threshold=0.9, capacity_factor=0.2, backend=backend)
    x = torch.randn(40, D_MODEL, requires_grad=True)
    y = moe(x)
    kept = set(moe.last_routing.token_idx.tolist())
    dropped = torch.tensor([t for t in range(40) if t not in kept])
    assert len(dropped) > 0
    assert torch.count_nonzero(y[dropped]) == 0
    kept_t = torch.tensor(sorted(kept))
    assert bool((y[kept_t].abs().sum(-1) > 0).all())
    # no gradient flows into a fully-dropped token's input through the experts or router
    y.sum().backward()
    assert torch.count_nonzero(x.grad[dropped]) == 0


@pytest.mark.parametrize("cf", [4.0, 10.0, 1000.0])
def test_capacity_larger_than_tokens_never_crashes_and_drops_nothing(cf):
    x = torch.randn(6, D_MODEL)
    moe = make_moe(router="topk", k=2)
    y_dropless = moe(x)
    moe.capacity_factor = cf
    y = moe(x)
    assert moe.last_routing.dropped_fraction == 0.0
    torch.testing.assert_close(y, y_dropless, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_drops_are_deterministic(backend):
    moe = make_moe(router="threshold", threshold=0.9, capacity_factor=0.5, backend=backend)
    x = torch.randn(50, D_MODEL)
    y1 = moe(x)
    r1 = moe.last_routing
    y2 = moe(x)
    r2 = moe.last_routing
    assert r1.dropped_fraction > 0
    assert torch.equal(r1.token_idx, r2.token_idx)
    assert torch.equal(r1.expert_idx, r2.expert_idx)
    assert torch.equal(y1, y2)


def test_forward_with_routing_keeps_no_state():
    moe = make_moe()
    x = torch.randn(5, D_MODEL)
    y, routing = moe.forward_with_routing(x)
    assert moe.last_routing is None
    assert routing.num_tokens == 5
    torch.testing.assert_close(y, moe(x), atol=0, rtol=0)
