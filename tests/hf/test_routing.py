"""Changing the routing of a patched HF model: thresholds, budgets, entropy-k, restore."""

from __future__ import annotations

import pytest
import torch
from hf_moe_tiny import FAMILIES, threshold_qwen_gpt, tiny_model, token_batch, transformers

import xmoe.hf as xh
from xmoe.routing import make_router


def sharing_router(block, name: str, **options):
    """An xmoe router ``name`` on ``block``'s own router weight (the tensor shared)."""
    router = make_router(name, block.d_model, block.num_experts, **options)
    router.weight = block.router.weight
    return router


def rates(model):
    return [b.last_routing.experts_per_token for b in xh.moe_blocks(model)]


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_changes_compute_and_native_restores_the_logits_exactly(family):
    model = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        xh.patch(model)
        xh.set_routing(model, "threshold", threshold=0.3)
        low = model(input_ids=ids).logits
        low_rates = rates(model)
        xh.set_routing(model, "threshold", threshold=0.95)
        model(input_ids=ids)
        high_rates = rates(model)
        xh.set_routing(model, "native")
        back = model(input_ids=ids).logits
    assert all(a < b for a, b in zip(low_rates, high_rates))
    assert (low - ref).abs().max() > 1e-4  # the routing really changed
    assert torch.equal(back, model(input_ids=ids).logits)
    assert (back - ref).abs().max() < 1e-5


def test_per_layer_thresholds_and_bad_lengths():
    model = tiny_model("mixtral")
    xh.patch(model)
    xh.set_routing(model, "threshold", threshold=[0.2, 0.99])
    with torch.no_grad():
        model(input_ids=token_batch())
    r = rates(model)
    assert r[0] < 1.5 and r[1] > 3
    with pytest.raises(ValueError, match="one per MoE layer"):
        xh.set_routing(model, "threshold", threshold=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="needs threshold"):
        xh.set_routing(model, "threshold")
    with pytest.raises(ValueError, match="rule"):
        xh.set_routing(model, "top_p", threshold=0.5)
    with pytest.raises(ValueError, match="patch"):
        xh.set_routing(torch.nn.Linear(2, 2), "native")


def test_topk_and_entropy_k_rules():
    model = tiny_model("qwen3_moe")
    xh.patch(model)
    ids = token_batch()
    with torch.no_grad():
        xh.set_routing(model, "topk", k=[1, 3])
        model(input_ids=ids)
        assert rates(model) == [1.0, 3.0]
        xh.set_routing(model, "entropy_k", entropy_cutoffs=(0.01, 0.02, 0.03))
        model(input_ids=ids)
        assert rates(model) == [4.0, 4.0]  # every token's entropy is above the cut-offs
        xh.set_routing(model, "entropy_k", entropy_cutoffs=[(0.999,), (0.01,)])
        model(input_ids=ids)
        assert rates(model) == [1.0, 2.0]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("rule", ["threshold", "entropy_k"])
def test_fit_budget_reaches_the_target_on_the_calibration_inputs(family, rule):
    model = tiny_model(family)
    blocks = xh.patch(model)
    calib = [token_batch(s, batch=4, length=16) for s in range(3)]
    inputs = xh.capture_inputs(model, calib, max_tokens=128)
    assert [x.shape for x in inputs] == [(128, 32)] * len(blocks)
    fitted = xh.fit_budget(model, inputs, flop_fraction=0.75, rule=rule, tolerance=0.02)
    assert [f["target"] for f in fitted] == [1.5] * len(blocks)
    with torch.no_grad():
        for b, x, f in zip(blocks, inputs, fitted):
            got = b.router(x).experts_per_token
            assert got == pytest.approx(f["achieved"]) and abs(got - 1.5) <= 0.03 + 1 / 128
    state = xh.routing_state(model)
    assert all(s["selection"] == rule for s in state)
    with pytest.raises(ValueError, match="exactly one"):
        xh.fit_budget(model, inputs)


def test_replace_router_with_another_xmoe_router_and_restore():
    model = tiny_model("mixtral")
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    xh.patch(model)

    xh.replace_router(model, lambda b: sharing_router(b, "threshold", threshold=0.7))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        xh.set_routing(model, "threshold", threshold=0.7, normalize=False)
        b = model(input_ids=ids).logits
        xh.set_routing(model, "native")
        assert (model(input_ids=ids).logits - ref).abs().max() < 1e-5
    assert (a - b).abs().max() < 1e-6
    with pytest.raises(ValueError, match="num_experts"):
        xh.replace_router(model, lambda b: make_router("topk", b.d_model, 3))


def test_native_restores_deepseek_bias_after_a_router_without_one():
    model = tiny_model("deepseek_v3")
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    xh.patch(model)

    xh.replace_router(model, lambda b: sharing_router(b, "topk", k=2))
    xh.set_routing(model, "native")
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() < 1e-5
    assert not any("native_selection_bias" in key for key in model.state_dict())


def test_exported_threshold_gpt_comes_back_as_the_scored_threshold_rule(tmp_path):
    from xmoe.hf.export import export_model

    gpt = threshold_qwen_gpt(64, 0.6)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "router" not in name and "norm" not in name and ".ln" not in name:
                p.mul_(4.0)
    out = export_model(gpt, tmp_path / "hf")
    ids = token_batch(length=16)
    model = xh.from_pretrained(out).eval()
    state = xh.routing_state(model)
    assert [(s["selection"], s["threshold"]) for s in state] == [("threshold", 0.6)] * 2
    with torch.no_grad():
        ours = gpt(ids).logits
        got = model(input_ids=ids).logits
        assert (got - ours).abs().max() < 1e-4
        xh.fit_budget(model, xh.capture_inputs(model, [ids]), target_experts_per_token=1.5)
        xh.set_routing(model, "native")  # the exported top-4 = what plain transformers runs
        plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() < 1e-5


def test_one_threshold_for_all_layers_meets_the_mean_budget():
    model = tiny_model("qwen2_moe")
    blocks = xh.patch(model)
    inputs = xh.capture_inputs(model, [token_batch(s, batch=4, length=16) for s in range(2)])
    fitted = xh.fit_budget(model, inputs, target_experts_per_token=1.6, per_layer=False)
    assert len({f["threshold"] for f in fitted}) == 1
    with torch.no_grad():
        got = [b.router(x).experts_per_token for b, x in zip(blocks, inputs)]
    assert [f["achieved"] for f in fitted] == pytest.approx(got)
    assert sum(got) / len(got) == pytest.approx(1.6, rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_one_within_the_native_topk_is_the_native_routing(family):
    model = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        xh.patch(model)
        k = xh.native_k(model)[0]
        xh.set_routing(model, "threshold", threshold=1.0, candidates=k)
        assert (model(input_ids=ids).logits - ref).abs().max() < 1e-5
        xh.set_routing(model, "threshold", threshold=0.5, candidates=k)
        model(input_ids=ids)
    assert all(1 <= r < k for r in rates(model))
