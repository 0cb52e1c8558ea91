"""Typed config sections from nested dicts: :func:`from_dict` builds a dataclass, checking each
value against its field's type and rejecting unknown keys by their full path (``model.moe.x``).
Shared by the run config (train/config.py) and the tasks' ``task_options`` (train/tasks.py)."""

from __future__ import annotations

import dataclasses
import types
import typing

from .._checks import is_number


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by their full path."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown config key {path!r}; accepted: {sorted(fields)}")
        kwargs[key] = _value(path, hints[key], value)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ValueError(f"config key {prefix + name!r} is required")
    return cls(**kwargs)


def _value(path: str, hint, value):
    """``value`` as the field type ``hint``: a sub-config (a dataclass, or an optional one where
    None and ``{}`` mean off) or a checked scalar."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, prefix=f"{path}.")
    sub = _optional_dataclass(hint)
    if sub is not None:
        if value is None or value == {}:
            return None
        if isinstance(value, sub):
            return value
        return from_dict(sub, value, prefix=f"{path}.")
    return _coerce(path, hint, value)


def _optional_dataclass(hint) -> type | None:
    """``X`` for a hint ``X | None`` where X is a dataclass, else None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def _coerce(path: str, hint, value):
    """Light type check/coercion for scalar config values (ints accepted where floats are)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, inner[0], value) if len(inner) == 1 else value
    if hint is float and is_number(value):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"config key {path!r} must be {hint.__name__}, got {value!r}")
    if (hint is dict or origin is dict) and not isinstance(value, dict):
        raise ValueError(f"config key {path!r} must be a mapping, got {value!r}")
    return value
