"""Each HF sparse MoE block against the xmoe block built from a copy of it: outputs, gradients,
shared storage, and non-native rules against HF's own experts code."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_moe_tiny import FAMILIES, tiny_model

from xmoe.hf.block import block_family, build_moe


def first_block(model):
    return next(m for m in model.modules() if block_family(m) is not None)


def hf_pairs_to_dense(routing, num_experts):
    """Ragged kept pairs -> HF's padded (index, weight) with the sentinel expert E."""
    n = routing.num_tokens
    width = max(int(torch.bincount(routing.token_idx, minlength=n).max()), 1)
    index = torch.full((n, width), num_experts, dtype=torch.long)
    weight = torch.zeros(n, width)
    slot = torch.zeros(n, dtype=torch.long)
    for t, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight):
        index[t, slot[t]] = e
        weight[t, slot[t]] = w
        slot[t] += 1
    return index, weight


def shared_out(family, block, x):
    if family == "qwen2_moe":
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if family == "deepseek_v3":
        return block.shared_experts(x)
    return 0


@pytest.mark.parametrize("family", FAMILIES)
def test_native_block_equals_hf_outputs_and_gradients(family):
    hf = first_block(tiny_model(family))
    ours = build_moe(block_family(hf).name, copy.deepcopy(hf), 0, backend="loop")
    x = torch.randn(2, 5, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    probe = torch.randn(2, 5, 32)
    ya, yb = hf(xa), ours(xb)
    assert (ya - yb).abs().max() < 1e-5
    (ya * probe).sum().backward()
    (yb * probe).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(hf.gate.weight.grad, ours.router.weight.grad, atol=1e-5)
    h = ours.d_expert
    g_up = hf.experts.gate_up_proj.grad
    assert torch.allclose(g_up[:, :h].transpose(1, 2), ours.experts.w1.grad, atol=1e-5)
    assert torch.allclose(g_up[:, h:].transpose(1, 2), ours.experts.w3.grad, atol=1e-5)
    assert torch.allclose(
        hf.experts.down_proj.grad.transpose(1, 2), ours.experts.w2.grad, atol=1e-5
    )


@pytest.mark.parametrize("backend", ["auto", "segment", "loop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_shares_the_hf_tensors(family, backend):
    hf = first_block(tiny_model(family))
    ours = build_moe(block_family(hf).name, hf, 0, backend=backend)
    ptr = lambda t: t.untyped_storage().data_ptr()
    assert ours.router.weight is hf.gate.weight
    assert ptr(ours.experts.w1) == ptr(hf.experts.gate_up_proj) == ptr(ours.experts.w3)
    assert ptr(ours.experts.w2) == ptr(hf.experts.down_proj)
    if family == "deepseek_v3":
        assert ours.router.selection_bias is hf.gate.e_score_correction_bias
        assert ptr(ours.shared_experts.w1) == ptr(hf.shared_experts.gate_proj.weight)
    if family == "qwen2_moe":
        assert ours.shared_gate is hf.shared_expert_gate
        assert ptr(ours.shared_experts.w2) == ptr(hf.shared_expert.down_proj.weight)
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        assert (hf(x) - ours(x)).abs().max() < 1e-5


@pytest.mark.parametrize("rule", [("threshold", 0.6), ("threshold", 1.0), ("entropy_k", None)])
@pytest.mark.parametrize("family", FAMILIES)
def test_other_rules_equal_hf_experts_run_on_the_same_pairs(family, rule):
    """Routing changed, the experts are still HF's: feed the ragged pairs to HF's own experts
    code (padded with its sentinel expert) and add the shared experts by hand."""
    model = tiny_model(family)
    model.config._experts_implementation = "eager"
    hf = first_block(model)
    ours = build_moe(block_family(hf).name, hf, 0)
    name, t = rule
    ours.use_routing(selection=name, **({"threshold": t} if t else {"entropy_cutoffs": (0.3, 0.7)}))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        y = ours(x).reshape(-1, 32)
        routing = ours.last_routing
        index, weight = hf_pairs_to_dense(routing, ours.num_experts)
        flat = x.reshape(-1, 32)
        ref = hf.experts(flat, index, weight) + shared_out(family, hf, flat)
    assert (y - ref).abs().max() < 1e-5
    if t == 1.0 and family != "deepseek_v3":
        assert routing.experts_per_token == ours.num_experts
    if t == 1.0 and family == "deepseek_v3":
        assert routing.experts_per_token == 4  # topk_group=2 of 4 groups of 2 experts
