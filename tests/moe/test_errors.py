"""Invalid arguments and inputs raise ValueError with a message that names the culprit."""

from __future__ import annotations

import pytest
import torch

from conftest import D_EXPERT, D_MODEL, NUM_EXPERTS, make_moe
from xmoe import Experts, MoE, ThresholdRouter, TopKRouter, make_router


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_threshold_out_of_range_is_rejected(threshold):
    with pytest.raises(ValueError, match="threshold"):
        ThresholdRouter(D_MODEL, NUM_EXPERTS, threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        make_moe(router="threshold", threshold=threshold)


@pytest.mark.parametrize("threshold", [1e-6, 0.5, 1.0, 1])
def test_threshold_in_range_is_accepted(threshold):
    assert ThresholdRouter(D_MODEL, NUM_EXPERTS, threshold=threshold).threshold == float(threshold)


@pytest.mark.parametrize("k", [0, -1, NUM_EXPERTS + 1, 1.5, True])
def test_topk_k_out_of_range_is_rejected(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        TopKRouter(D_MODEL, NUM_EXPERTS, k=k)
    with pytest.raises(ValueError, match=r"\bk\b"):
        make_moe(router="topk", k=k)


@pytest.mark.parametrize("k", [1, NUM_EXPERTS])
def test_topk_k_at_the_bounds_is_accepted(k):
    assert make_moe(router="topk", k=k).router.k == k


@pytest.mark.parametrize("max_experts", [0, -1, NUM_EXPERTS + 1, 2.0])
def test_max_experts_out_of_range_is_rejected(max_experts):
    with pytest.raises(ValueError, match="max_experts"):
        make_moe(router="threshold", max_experts=max_experts)


@pytest.mark.parametrize("num_experts", [0, -2])
def test_num_experts_must_be_positive(num_experts):
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D_MODEL, num_experts, D_EXPERT)
    with pytest.raises(ValueError, match="num_experts"):
        ThresholdRouter(D_MODEL, num_experts)


@pytest.mark.parametrize("d_expert", [0, -4, 2.5])
def test_d_expert_must_be_positive_integer(d_expert):
    with pytest.raises(ValueError, match="d_expert"):
        MoE(D_MODEL, NUM_EXPERTS, d_expert)


def test_d_model_must_be_positive():
    with pytest.raises(ValueError, match="d_model"):
        MoE(0, NUM_EXPERTS, D_EXPERT)


@pytest.mark.parametrize("shape", [(3, D_MODEL + 1), (2, 5, D_MODEL - 1), (D_MODEL, 1), ()])
def test_input_width_mismatch_is_rejected_at_forward(shape):
    moe = make_moe()
    with pytest.raises(ValueError, match="d_model"):
        moe(torch.randn(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad):
    moe = make_moe()
    x = torch.randn(4, D_MODEL)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or inf"):
        moe(x)


def test_non_finite_router_weight_is_rejected():
    moe = make_moe()
    with torch.no_grad():
        moe.router.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        moe(torch.randn(4, D_MODEL))


def test_unknown_router_name_is_rejected_with_choices():
    with pytest.raises(ValueError, match=r"router must be one of .*'threshold'.*'nope'"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, router="nope")
    with pytest.raises(ValueError, match="router"):
        make_router("nope", D_MODEL, NUM_EXPERTS)


def test_unknown_router_option_is_rejected_and_named():
    with pytest.raises(ValueError, match=r"unknown option.*'thresold'"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, router="threshold", thresold=0.5)
    # k belongs to topk, not to the threshold router
    with pytest.raises(ValueError, match=r"unknown option.*'k'"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, router="threshold", k=2)


def test_router_options_with_router_instance_are_rejected():
    router = TopKRouter(D_MODEL, NUM_EXPERTS)
    with pytest.raises(ValueError, match="router_options"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, router=router, k=1)


def test_router_instance_with_wrong_num_experts_is_rejected():
    router = TopKRouter(D_MODEL, NUM_EXPERTS + 1)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, router=router)


@pytest.mark.parametrize("activation", ["tanh", "GELU", "", None])
def test_unknown_activation_is_rejected(activation):
    with pytest.raises(ValueError, match="activation"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, activation=activation)


@pytest.mark.parametrize("cf", [0, 0.0, -1, -0.5, float("nan"), True, "1", "drop"])
def test_bad_capacity_factor_is_rejected(cf):
    with pytest.raises(ValueError, match=r"^capacity_factor"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, capacity_factor=cf)
    with pytest.raises(ValueError, match=r"^eval_capacity_factor"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, eval_capacity_factor=cf)


@pytest.mark.parametrize("backend", ["cuda", "grouped", "", None])
def test_unknown_backend_is_rejected(backend):
    with pytest.raises(ValueError, match="backend"):
        MoE(D_MODEL, NUM_EXPERTS, D_EXPERT, backend=backend)


def test_grouped_mm_backend_with_misaligned_sizes_fails_with_a_hint():
    experts = Experts(NUM_EXPERTS, 6, 5, backend="grouped_mm")
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"grouped_mm.*d_model=6, d_expert=5"):
        experts(x, torch.tensor([3, 0, 0, 0]), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(balance_over="all"), "balance_over"), (dict(init_std=0.0), "init_std")],
)
def test_bad_linear_router_options_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_router("threshold", D_MODEL, NUM_EXPERTS, **kwargs)
