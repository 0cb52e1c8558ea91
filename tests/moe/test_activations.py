"""The one activation table and the one grouped_mm alignment rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe.moe.activations import (
    ACTIVATIONS,
    activation_backward,
    activation_fn,
    activation_module,
    builtin_name,
    resolve_activation,
)
from xmoe.moe.kernels.grouped import grouped_mm_supported


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_hand_written_backward_equals_autograd(name):
    h = (3 * torch.randn(200, dtype=torch.float64)).requires_grad_(True)
    grad = torch.randn_like(h)
    (want,) = torch.autograd.grad(activation_fn(name)(h), h, grad)
    torch.testing.assert_close(activation_backward(grad, h.detach(), name), want)


@pytest.mark.parametrize("name", ["gelu", "relu", "silu"])
def test_module_and_function_agree_and_are_recognised(name):
    x = torch.randn(50)
    module = activation_module(name)
    torch.testing.assert_close(module(x), activation_fn(name)(x))
    assert builtin_name(module) == name


def test_other_callables_are_no_builtin():
    assert builtin_name(lambda h: F.gelu(h, approximate="tanh")) is None
    assert builtin_name(torch.tanh) is None
    assert builtin_name(None) is None


def test_resolve_activation():
    swiglu = resolve_activation("swiglu")
    assert swiglu.glu and swiglu.builtin == "silu" and swiglu.fn is F.silu
    assert resolve_activation("gelu", glu=True).glu
    act = resolve_activation(torch.tanh)
    assert act.fn is torch.tanh and act.builtin is None and not act.glu
    for bad in ("tanh", "", None, 3):
        with pytest.raises(ValueError, match="activation"):
            resolve_activation(bad)
    with pytest.raises(ValueError, match="activation"):
        activation_module("swiglu")


def test_grouped_mm_alignment_rule():
    """fp32: widths multiple of 4; bf16: of 8 (16-byte rows); other dtypes never."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm unavailable")
    assert grouped_mm_supported(torch.float32, 16, 4)
    assert not grouped_mm_supported(torch.float32, 16, 6)
    assert grouped_mm_supported(torch.bfloat16, 16, 8)
    assert not grouped_mm_supported(torch.bfloat16, 16, 4)
    assert not grouped_mm_supported(torch.float64, 16, 8)
    assert not grouped_mm_supported(torch.float16, 16, 8)
