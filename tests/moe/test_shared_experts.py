"""Shared (always-on) experts inside the MoE layer, against a per-token loop oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe.moe import MoE, MoEConfig
from xmoe.moe.experts import backend_available


def expert_ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ experts.w1[e]
    if experts.b1 is not None:
        h = h + experts.b1[e]
    h = F.silu(h) if experts.glu else F.gelu(h)
    if experts.glu:
        h = h * (x @ experts.w3[e])
    y = h @ experts.w2[e]
    return y if experts.b2 is None else y + experts.b2[e]


def oracle(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    routing = moe.router(x)
    out = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for i in (routing.token_idx == t).nonzero().flatten().tolist():
            e = int(routing.expert_idx[i])
            y = y + routing.weight[i] * expert_ffn(moe.experts, e, x[t])
        shared = sum(
            expert_ffn(moe.shared_experts, s, x[t]) for s in range(moe.shared_experts.num_experts)
        )
        if moe.shared_gate is not None:
            shared = torch.sigmoid(x[t] @ moe.shared_gate.weight[0]) * shared
        out.append(y + shared)
    return torch.stack(out)


BACKENDS = [b for b in ("loop", "segment", "native", "grouped_mm")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("num_shared", [1, 2])
def test_outputs_and_gradients_match_the_loop_oracle(backend, gate, num_shared):
    if not backend_available(backend, torch.float32, 8, 8):
        pytest.skip(f"{backend} not available here")
    torch.manual_seed(0)
    moe = MoE(
        8, 4, 4, router="topk", k=2, activation="swiglu", bias=False, backend=backend,
        num_shared_experts=num_shared, d_shared=8, shared_gate=gate,
    )  # fmt: skip
    x = torch.randn(6, 8, requires_grad=True)
    probe = torch.randn(6, 8)
    (moe(x) * probe).sum().backward()
    params = [x, moe.router.weight, moe.experts.w1, moe.shared_experts.w1, moe.shared_experts.w2]
    if gate:
        params.append(moe.shared_gate.weight)
    got = [p.grad.clone() for p in params]
    y = moe(x).detach()
    for p in params:
        p.grad = None
    ref = oracle(moe, x)
    (ref * probe).sum().backward()
    assert torch.allclose(y, ref.detach(), atol=1e-5)
    for g, p in zip(got, params):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_flops_and_compute_ratio_count_the_shared_experts():
    moe = MoE(16, 8, 4, router="topk", k=2, activation="swiglu", num_shared_experts=2, d_shared=6)
    assert moe.compute_ratio(2.0, 32) == pytest.approx((2 * 4 + 2 * 6) / 32)
    per_row = 2 * 16 * 4 * 3
    assert moe.expert_flops_per_token(1.5) == pytest.approx(1.5 * per_row + 2 * 2 * 16 * 6 * 3)
    plain = MoE(16, 8, 4, router="topk", k=2)
    assert plain.compute_ratio(2.0, 32) == pytest.approx(8 / 32)


def test_from_config_builds_shared_experts_and_gate():
    cfg = MoEConfig(
        num_experts=4, d_expert=8, router="topk", router_options={"k": 1},
        shared_experts=1, d_shared=16, shared_gate=True, activation="swiglu", bias=False,
    )  # fmt: skip
    moe = MoE.from_config(cfg, 12)
    assert moe.shared_experts.num_experts == 1 and moe.shared_experts.d_expert == 16
    assert moe.shared_gate.weight.shape == (1, 12)
    assert moe(torch.randn(2, 3, 12)).shape == (2, 3, 12)


def test_no_shared_experts_by_default_and_bad_options_raise():
    assert MoE(8, 4, 4).shared_experts is None
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoE(8, 4, 4, num_shared_experts=-1)
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(8, 4, 4, shared_gate=True)
    with pytest.raises(ValueError, match="d_shared"):
        MoE(8, 4, 4, num_shared_experts=1, d_shared=0)
