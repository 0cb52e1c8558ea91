"""The one set of argument checks. Each raises ``ValueError`` naming the argument and the range.

``bool`` is never accepted where a number is expected (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (``high=None``: no upper bound); returns it."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return value


def check_bool(name: str, value: bool) -> bool:
    """``True`` or ``False`` (not 0/1, not a string); returns it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_positive(name: str, value: float) -> float:
    """A finite number > 0; returns it."""
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number in ``[low, high]``, each end open on request (``(0, 1]``...); returns it."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        rng = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices) -> object:
    """One of ``choices``; returns it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, x: object) -> object:
    """A floating-point ``torch.Tensor``; a ``TypeError`` naming the dtype otherwise (integer,
    bool and complex inputs would reach a kernel that cannot take them)."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {x.dtype}"
        )
    return x


def check_kwargs(where: str, kwargs: dict, accepted) -> dict:
    """No keyword argument outside ``accepted``; a ``TypeError`` naming the unknown ones."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {unknown}; accepted: {sorted(accepted)}"
        )
    return kwargs
