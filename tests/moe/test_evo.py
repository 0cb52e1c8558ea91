"""EvoMoE expert-diversify (``xmoe.moe.evo``): copies of a dense FFN or expert, and the MoE spawned
from them.
"""

from __future__ import annotations

import pytest
import torch

from conftest import D_EXPERT, D_MODEL, expert_apply
from xmoe.models.gpt import DenseFFN
from xmoe.moe.evo import diversify_experts, spawn_moe
from xmoe.moe.experts import Experts
from xmoe.routing import ROUTERS
from xmoe.routing.dts import DenseToSparseRouter

E = 6


N = 20


def _x(n=N, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


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
