"""The one activation table: names, forward functions, hand-written backwards, modules.

Built-in names (what configs spell):

========  ==========================  ==========================================
name      elementwise activation       expert FFN
========  ==========================  ==========================================
``gelu``  ``F.gelu`` (exact erf)       ``gelu(x w1 + b1) w2 + b2``
``relu``  ``F.relu``                   ``relu(x w1 + b1) w2 + b2``
``silu``  ``F.silu``                   ``silu(x w1 + b1) w2 + b2``
``swiglu`` ``F.silu``, gated (GLU)     ``silu(x w1 + b1) * (x w3 + b3) w2 + b2``
========  ==========================  ==========================================

Any other elementwise callable (e.g. GPT-2's tanh GELU) can stand in for a name: see
:func:`resolve_activation`. The ``segment`` kernel needs a hand-written backward, so it runs only
built-in activations; a callable that equals a built-in bit for bit is recognised as it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
GATED = {"swiglu": "silu"}  # gated name -> its elementwise activation
ACTIVATIONS = (*ELEMENTWISE, *GATED)
_MODULES: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function of a built-in name (``"swiglu"`` → ``F.silu``)."""
    return ELEMENTWISE[GATED.get(name, name)]


def activation_backward(grad: Tensor, pre: Tensor, name: str) -> Tensor:
    """``d act(pre) / d pre * grad`` for a built-in name; ``grad, pre: [A, h]``."""
    name = GATED.get(name, name)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    return torch.ops.aten.silu_backward(grad, pre)


def activation_module(name: str) -> nn.Module:
    """``nn.GELU()``, ``nn.ReLU()`` or ``nn.SiLU()`` for an elementwise built-in name."""
    if name not in _MODULES:
        raise ValueError(f"activation must be one of {tuple(_MODULES)}, got {name!r}")
    return _MODULES[name]()


def builtin_name(fn: Callable[[Tensor], Tensor] | None) -> str | None:
    """``"gelu"``, ``"relu"`` or ``"silu"`` when ``fn`` equals that function bit for bit on a grid
    over [-8, 8] (so the hand-written kernels are exact for it), else None."""
    if fn is None:
        return None
    x = torch.linspace(-8, 8, 2001)
    with torch.no_grad():
        y = fn(x)
        for name, f in ELEMENTWISE.items():
            if torch.equal(y, f(x)):
                return name
    return None


@dataclass(frozen=True)
class Activation:
    """A resolved expert activation.

    Attributes:
        fn: the elementwise callable (the user's own, when one was given).
        glu: gated: ``fn(x w1 + b1) * (x w3 + b3)``.
        builtin: the elementwise built-in name ``fn`` equals (``"gelu"``, ``"relu"``,
            ``"silu"``), whose hand-written backward the ``segment`` kernel uses; None otherwise.
    """

    fn: Callable[[Tensor], Tensor]
    glu: bool
    builtin: str | None


def resolve_activation(
    activation: str | Callable[[Tensor], Tensor], glu: bool = False
) -> Activation:
    """A name from :data:`ACTIVATIONS` or an elementwise callable → :class:`Activation`.

    ``glu=True`` gates the activation (a name that is already gated, ``"swiglu"``, is gated
    either way).
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {ACTIVATIONS} or a callable, got {activation!r}"
            )
        name = GATED.get(activation, activation)
        return Activation(ELEMENTWISE[name], glu or activation in GATED, name)
    if not callable(activation):
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or a callable, got {activation!r}"
        )
    return Activation(activation, glu, builtin_name(activation))
