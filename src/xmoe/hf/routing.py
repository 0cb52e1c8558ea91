"""Change the routing of a patched HF model at inference, and fit it to a compute budget.

- :func:`set_routing`: one rule for every MoE block (or per layer): ``threshold`` (t globally or
  a list per layer), ``topk`` (k), ``entropy_k`` (cut-offs), ``native``.
- :func:`replace_router`: any other xmoe router, built per block by a callable.
- :func:`fit_budget`: per-layer t (or entropy cut-off) fitted on calibration inputs to a target
  mean experts/token, given directly or as a fraction of the native top-k FLOPs.
- :func:`apply_xmoe_section` (from :mod:`xmoe.hf.restore`): the routing an xmoe export wrote
  into config.json; :func:`restore_threshold_section` reads a hand-written section.

Restoring native routing (``set_routing(model, "native")``) gives the HF logits back exactly:
the router weight and experts never change, only the selection rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive, check_range
from ..routing import Router
from ..routing.budget import calibrate_threshold
from .block import HFMoE, require_blocks
from .restore import apply_xmoe_section

RULES = ("native", "topk", "threshold", "entropy_k")

__all__ = [
    "RULES",
    "apply_xmoe_section",
    "capture_inputs",
    "fit_budget",
    "native_k",
    "replace_router",
    "restore_threshold_section",
    "routing_state",
    "set_routing",
]


def _per_layer(name: str, value, n: int, scalar: Callable[[object], bool]) -> list:
    """``value`` for each of ``n`` layers: a scalar repeated, or a list of length ``n``."""
    if scalar(value):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"{name} must be one value or {n} values (one per MoE layer), got {value!r}"
        )
    return values


def set_routing(
    model: nn.Module,
    rule: str = "threshold",
    *,
    threshold: float | Sequence[float] | None = None,
    k: int | Sequence[int] | None = None,
    entropy_cutoffs: Sequence[float] | Sequence[Sequence[float]] | None = None,
    max_experts: int | None = None,
    candidates: int | None = None,
    normalize: bool | None = None,
) -> None:
    """Set the selection rule of every MoE block of a patched model.

    Args:
        rule: ``"native"`` (the HF rule), ``"topk"``, ``"threshold"`` or ``"entropy_k"``.
        threshold: t in (0, 1], one value or one per MoE layer (``threshold`` rule).
        k: experts per token, one or one per layer (``topk``; default: the native k).
        entropy_cutoffs: ascending cut-offs in (0, 1], or one such list per layer (``entropy_k``).
        max_experts: cap on experts per token (``threshold``, ``entropy_k``).
        candidates: choose among the top ``candidates`` experts only, their share
            renormalised (``threshold``, ``entropy_k``); the native k gives a threshold within
            the model's own top-k.
        normalize: renormalise the kept weights; default: the family's own setting.

    The score function, selection bias, groups and scaling stay the family's.
    """
    check_choice("rule", rule, RULES)
    blocks = require_blocks(model)
    n = len(blocks)
    if rule == "native":
        for b in blocks:
            b.restore_native()
        return
    common: dict = {"selection": rule}
    if max_experts is not None:
        common["max_experts"] = max_experts
    if candidates is not None:
        common["candidates"] = candidates
    if normalize is not None:
        common["normalize"] = normalize
    per: list[dict] = [dict(common) for _ in blocks]
    if rule == "threshold":
        if threshold is None:
            raise ValueError("rule='threshold' needs threshold (one value or one per MoE layer)")
        for d, t in zip(per, _per_layer("threshold", threshold, n, _is_number)):
            d["threshold"] = t
    elif rule == "topk" and k is not None:
        for d, kk in zip(per, _per_layer("k", k, n, _is_number)):
            d["k"] = kk
    elif rule == "entropy_k":
        if entropy_cutoffs is None:
            raise ValueError("rule='entropy_k' needs entropy_cutoffs")
        values = list(entropy_cutoffs)
        flat = all(_is_number(v) for v in values)
        cuts = [tuple(values)] * n if flat else _per_layer("entropy_cutoffs", values, n, _is_number)
        for d, c in zip(per, cuts):
            d["entropy_cutoffs"] = tuple(c)
    for b, d in zip(blocks, per):
        b.use_routing(**d)


def replace_router(model: nn.Module, factory: Callable[[HFMoE], Router]) -> None:
    """Any xmoe router: ``factory(block)`` returns the router for each block (its
    ``num_experts`` must be the block's; copy or share ``block.router.weight`` as it needs).
    ``set_routing(model, "native")`` restores the HF rule."""
    for b in require_blocks(model):
        router = factory(b)
        if not isinstance(router, Router) or router.num_experts != b.num_experts:
            raise ValueError(
                f"factory must return a Router with num_experts={b.num_experts}, got {router!r}"
            )
        b.router = router


def routing_state(model: nn.Module) -> list[dict]:
    """Each block's current router options (``ScoredRouter.options()``, or the class name)."""
    out = []
    for b in require_blocks(model):
        opts = getattr(b.router, "options", None)
        out.append(opts() if callable(opts) else {"router": type(b.router).__name__})
    return out


@torch.no_grad()
def capture_inputs(
    model: nn.Module, batches: Iterable[Tensor], max_tokens: int = 8192
) -> list[Tensor]:
    """Run ``model`` on ``batches`` (``input_ids [B, T]``) with its current routing and keep the
    first ``max_tokens`` inputs ``[N, d_model]`` of each MoE block (forward pre-hooks)."""
    blocks = require_blocks(model)
    store: list[list[Tensor]] = [[] for _ in blocks]
    counts = [0] * len(blocks)

    def hook(i):
        def fn(module, args):
            if counts[i] < max_tokens:
                x = args[0].reshape(-1, module.d_model)[: max_tokens - counts[i]]
                store[i].append(x.detach().float().clone())
                counts[i] += x.shape[0]

        return fn

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for ids in batches:
            model(input_ids=ids)
            if min(counts) >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


def native_k(model: nn.Module) -> list[int]:
    """Each block's native experts per token (routed, shared experts excluded)."""
    return [int(b.native_options["k"]) for b in require_blocks(model)]


@torch.no_grad()
def fit_budget(
    model: nn.Module,
    inputs: list[Tensor],
    *,
    target_experts_per_token: float | Sequence[float] | None = None,
    flop_fraction: float | None = None,
    rule: str = "threshold",
    max_k: int | None = None,
    max_experts: int | None = None,
    candidates: int | None = None,
    per_layer: bool = True,
    tolerance: float = 0.01,
) -> list[dict]:
    """Fit each layer's rule to a mean experts/token on its calibration ``inputs`` and set it.

    Args:
        inputs: per block ``[N, d_model]`` (:func:`capture_inputs`, under native routing).
        target_experts_per_token: the target routed experts/token (one, or one per layer).
        flop_fraction: or the target as a fraction of the native top-k routed-expert FLOPs
            (target = fraction x native k per layer), in (0, E / k].
        rule: ``"threshold"`` (fits t) or ``"entropy_k"`` (fits one cut-off ``c`` of the rule
            ``k = 1 + #{c_i < H}``; with ``max_k`` > 2 the cut-offs are ``c, c + s, ...`` evenly
            spaced up to 1).
        max_k: largest k of ``entropy_k``. Default: the native k (2 for top-2: one cut-off).
        max_experts: cap on the experts per token of the ``threshold`` rule (e.g. the native k,
            so no token uses more experts than the model was trained with). Default: none.
        candidates: the ``threshold`` rule chooses among the top ``candidates`` experts, their
            share renormalised (the native k: a threshold within the model's top-k).
        per_layer: fit each layer to its own target (default), or one t (one cut-off) for
            all layers so that their *mean* reaches the mean target: the rule then spends more
            experts in the layers whose routers are less sure.
        tolerance: relative tolerance of the bisection.

    Returns: per layer ``{"threshold" | "entropy_cutoffs": ..., "target": .., "achieved": ..}``
    (the layer's rate on the calibration inputs; the rate on other text differs a little).
    """
    check_choice("rule", rule, ("threshold", "entropy_k"))
    blocks = require_blocks(model)
    n = len(blocks)
    if (target_experts_per_token is None) == (flop_fraction is None):
        raise ValueError("give exactly one of target_experts_per_token and flop_fraction")
    if flop_fraction is not None:
        check_positive("flop_fraction", flop_fraction)
        targets = [flop_fraction * k for k in native_k(model)]
    else:
        targets = _per_layer("target_experts_per_token", target_experts_per_token, n, _is_number)
    if len(inputs) != n:
        raise ValueError(f"inputs must hold {n} tensors (one per MoE layer), got {len(inputs)}")
    for b, target in zip(blocks, targets):
        check_range("target_experts_per_token", target, 1, b.num_experts)
    kmax = {}
    if rule == "entropy_k":
        for b in blocks:
            kmax[b] = max_k if max_k is not None else int(b.native_options["k"])
            if kmax[b] < 2:
                raise ValueError(f"max_k must be >= 2 for entropy_k, got {kmax[b]}")

    def setting(b: HFMoE, u: float) -> dict:
        """Block ``b``'s rule at parameter ``u`` (the rate grows with ``u``): t itself, or
        ``1 - c`` for the entropy cut-off ``c``."""
        if rule == "threshold":
            return {
                "selection": "threshold",
                "threshold": u,
                "max_experts": max_experts,
                "candidates": candidates,
            }
        return {"selection": "entropy_k", "entropy_cutoffs": _cutoffs(1 - u, kmax[b])}

    def rate(pairs, u: float) -> float:
        rates = []
        for b, x in pairs:
            b.use_routing(**setting(b, u))
            rates.append(b.router(x).experts_per_token)
        return sum(rates) / len(rates)

    bounds = {"low": 1e-4, "high": 1.0 if rule == "threshold" else 1 - 1e-4}
    groups = (
        [[(b, x)] for b, x in zip(blocks, inputs)] if per_layer else [list(zip(blocks, inputs))]
    )
    group_targets = targets if per_layer else [sum(targets) / n]
    fitted = []
    for pairs, target in zip(groups, group_targets):
        u, got = calibrate_threshold(
            lambda u, pairs=pairs: rate(pairs, u), target, tolerance=tolerance, iters=40, **bounds
        )
        for b, x in pairs:
            opts = setting(b, u)
            b.use_routing(**opts)
            key = "threshold" if rule == "threshold" else "entropy_cutoffs"
            value = opts["threshold"] if rule == "threshold" else list(opts["entropy_cutoffs"])
            layer_rate = b.router(x).experts_per_token
            fitted.append({key: value, "target": target, "achieved": layer_rate})
    return fitted


def _cutoffs(c: float, kmax: int) -> tuple[float, ...]:
    """``kmax - 1`` ascending cut-offs from ``c`` spaced evenly towards 1 (exclusive)."""
    c = min(max(c, 1e-6), 1.0)
    step = (1.0 - c) / (kmax - 1)
    return tuple(c + i * step for i in range(kmax - 1))


def restore_threshold_section(model: nn.Module, section: dict) -> None:
    """Read ``{"router": "threshold" | "topk", "router_options": {...}}``: ``threshold`` (a
    float, or ``"thresholds"``: one per MoE layer), optional ``max_experts`` and
    ``renormalize``. A top-k section needs nothing: the exported top-k is exact."""
    if not isinstance(section, dict):
        raise ValueError(f"config.json 'xmoe' section must be a mapping, got {section!r}")
    router = section.get("router", "topk")
    opts = dict(section.get("router_options", {}))
    if router == "topk":
        return
    if router != "threshold":
        raise ValueError(
            f"config.json 'xmoe' section: router {router!r} cannot be restored; "
            "supported: 'threshold', 'topk'"
        )
    set_routing(
        model,
        "threshold",
        threshold=section.get("thresholds", opts.get("threshold", 0.9)),
        max_experts=opts.get("max_experts"),
        normalize=bool(opts.get("renormalize", False)),
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
