"""Experts with a callable activation (any elementwise function) against a per-pair loop oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe import Experts
from xmoe.moe.experts import grouped_mm_supported
from xmoe.moe.kernels.native_ffn import native_available

D, H, E = 16, 8, 4
SIZES = [5, 0, 7, 3]  # one empty expert


def tanh_gelu(h: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: no built-in equals it, so only the autograd backends can run it."""
    return F.gelu(h, approximate="tanh")


def _oracle(experts: Experts, x, expert_idx, weight, act) -> torch.Tensor:
    """``weight[a] * FFN_{e(a)}(x[a])`` one row at a time, straight from the stacked weights."""
    rows = []
    for a in range(x.shape[0]):
        e = int(expert_idx[a])
        h = x[a] @ experts.w1[e] + (0 if experts.b1 is None else experts.b1[e])
        h = act(h)
        if experts.w3 is not None:
            h = h * (x[a] @ experts.w3[e] + (0 if experts.b3 is None else experts.b3[e]))
        y = h @ experts.w2[e] + (0 if experts.b2 is None else experts.b2[e])
        rows.append(weight[a] * y)
    return torch.stack(rows)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(SIZES)
    expert_idx = torch.repeat_interleave(torch.arange(E), counts)
    x = torch.randn(int(counts.sum()), D, generator=gen).requires_grad_(True)
    weight = torch.rand(x.shape[0], generator=gen).requires_grad_(True)
    return x, counts, expert_idx, weight


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], g: torch.Tensor) -> list:
    return list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_callable_activation_matches_the_loop_oracle(backend, glu, bias):
    torch.manual_seed(0)
    experts = Experts(E, D, H, tanh_gelu, bias=bias, backend=backend, glu=glu)
    if backend == "auto":
        assert experts.resolve_backend(torch.float32) == "loop"
    if backend == "grouped_mm" and not grouped_mm_supported(torch.float32, D, H):
        pytest.skip("torch._grouped_mm unavailable")
    x, counts, expert_idx, weight = _inputs()
    y = experts(x, counts, expert_idx, weight)
    want = _oracle(experts, x, expert_idx, weight, tanh_gelu)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    tensors = [x, weight, *experts.parameters()]
    g = torch.randn_like(want)
    for got, ref in zip(_grads(y, tensors, g), _grads(want, tensors, g), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("glu", [False, True])
def test_callable_equal_to_a_builtin_runs_a_hand_written_kernel(glu):
    """nn.GELU() is F.gelu bit for bit: it runs `native` (GELU; the native kernel gates only
    SiLU) or `segment` (GEGLU, or no native build) and matches the named "gelu"."""
    torch.manual_seed(0)
    module_act = Experts(E, D, H, torch.nn.GELU(), glu=glu)
    named = Experts(E, D, H, "gelu", glu=glu, backend="loop")
    named.load_state_dict(module_act.state_dict())
    expected = "native" if native_available() and not glu else "segment"
    assert module_act.resolve_backend(torch.float32) == expected
    x, counts, expert_idx, weight = _inputs(1)
    y = module_act(x, counts, expert_idx, weight)
    want = named(x, counts, expert_idx, weight)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    tensors = [x, weight, *module_act.parameters()]
    ref_tensors = [x, weight, *named.parameters()]
    g = torch.randn_like(want)
    for got, ref in zip(_grads(y, tensors, g), _grads(want, ref_tensors, g), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gated_builtin_segment_kernel_matches_the_oracle_in_float64():
    """GEGLU (gelu with glu=True) through the hand-written kernel: outputs and gradients."""
    torch.manual_seed(0)
    experts = Experts(E, D, H, "gelu", backend="segment", glu=True).double()
    x, counts, expert_idx, weight = _inputs(2)
    x, weight = x.double().detach().requires_grad_(True), weight.double().detach().requires_grad_()
    y = experts(x, counts, expert_idx, weight)
    want = _oracle(experts, x, expert_idx, weight, F.gelu)
    torch.testing.assert_close(y, want)
    tensors = [x, weight, *experts.parameters()]
    g = torch.randn_like(want)
    for got, ref in zip(_grads(y, tensors, g), _grads(want, tensors, g), strict=True):
        torch.testing.assert_close(got, ref)


def test_segment_backend_rejects_a_callable_that_is_no_builtin():
    with pytest.raises(ValueError, match="segment.*loop"):
        Experts(E, D, H, tanh_gelu, backend="segment")


def test_output_bias_can_be_left_to_the_caller():
    experts = Experts(E, D, H, "relu", bias=True, output_bias=False)
    assert experts.b1 is not None and experts.b2 is None
    assert Experts(E, D, H, "relu", bias=False, output_bias=True).b2 is not None


def test_swiglu_is_gated_silu():
    torch.manual_seed(0)
    swiglu = Experts(E, D, H, "swiglu", backend="loop")
    gated = Experts(E, D, H, "silu", glu=True, backend="loop")
    gated.load_state_dict(swiglu.state_dict())
    x, counts, expert_idx, weight = _inputs(3)
    assert swiglu.glu and swiglu.flops_per_row == gated.flops_per_row
    torch.testing.assert_close(
        swiglu(x, counts, expert_idx, weight), gated(x, counts, expert_idx, weight)
    )


def test_backend_available_follows_the_grouped_mm_rule():
    from xmoe.moe.experts import backend_available

    assert backend_available("loop", torch.float64, 6, 5)
    assert backend_available("segment", torch.float64, 6, 5)
    aligned = grouped_mm_supported(torch.float32, 16, 8)
    assert backend_available("grouped_mm", torch.float32, 16, 8) == aligned
    assert not backend_available("grouped_mm", torch.float32, 16, 6)
    with pytest.raises(ValueError, match="backend"):
        backend_available("cuda", torch.float32, 16, 8)
