"""The checks of a run's ``model`` section beyond :meth:`GPTConfig.validate`, each naming the
full key (``model.moe.num_experts``) and the accepted range: what building the model would
otherwise refuse late, with a bare name, or accept silently."""

from __future__ import annotations

import math
import warnings

import torch

from .._checks import check_bool, check_choice, check_int, check_range, is_number
from ..models.gpt import GPTConfig


def validate_model(m: GPTConfig) -> None:
    """The checks of ``model`` beyond :meth:`GPTConfig.validate`, each naming the full key:
    what building the model would otherwise refuse late, or accept silently."""
    from ..moe.activations import ACTIVATIONS
    from ..moe.experts import BACKENDS
    from ..routing import make_router, router_class

    m.validate()
    check_range("model.dropout", m.dropout, 0.0, 1.0, high_open=True)
    check_choice("model.activation", m.activation, ACTIVATIONS)
    check_int("model.moe_every", m.moe_every, 0, m.n_layer)  # > n_layer: no MoE layer at all
    moe = m.moe
    check_int("model.moe.num_experts", moe.num_experts, 1)
    check_int("model.moe.d_expert", moe.d_expert, 1)
    check_choice("model.moe.activation", moe.activation, ACTIVATIONS)
    check_choice("model.moe.backend", moe.backend, BACKENDS)
    check_bool("model.moe.bias", moe.bias)
    if hasattr(moe, "shared_experts"):  # shared experts (DeepSeekMoE / Qwen2-MoE)
        check_int("model.moe.shared_experts", moe.shared_experts, 0)
        if getattr(moe, "d_shared", None) is not None:
            check_int("model.moe.d_shared", moe.d_shared, 1)
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, name)
        if value is None or value == "dropless" or value == math.inf:
            continue
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"model.moe.{name} must be null, 'dropless' or a number > 0, got {value!r}"
            )
    cls = router_class_or_error(moe.router, router_class)
    losses = sorted(known_router_losses())
    for name, coef in moe.loss_coefs.items():
        if name not in losses:
            raise ValueError(
                f"unknown config key 'model.moe.loss_coefs.{name}': not a router loss; "
                f"accepted: {losses}"
            )
        check_range(f"model.moe.loss_coefs.{name}", coef, 0.0, math.inf)
    options = dict(moe.router_options)
    if cls.uses_token_ids:
        options.setdefault("vocab_size", m.vocab_size)
    try:  # the router alone is small; its constructor checks its options
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its warnings come again when the model is built
            make_router(moe.router, m.d_model, moe.num_experts, **options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model.moe.router_options ({moe.router}): {exc}") from None


def router_class_or_error(name: object, router_class) -> type:
    if not isinstance(name, str):
        raise ValueError(f"config key 'model.moe.router' must be str, got {name!r}")
    try:
        return router_class(name)
    except ValueError as exc:
        raise ValueError(f"model.moe.router: {exc}") from None


def known_router_losses() -> set[str]:
    """Every loss name a registered router reports (a ``loss_coefs`` key must be one)."""
    from ..routing import available_routers, router_class

    names = {"z_loss"}
    for router in available_routers():
        names |= set(router_class(router).default_loss_coefs)
    return names
