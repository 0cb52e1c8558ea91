"""EvoMoE expert-diversify (Nie et al., 2021, arXiv 2112.14397).

EvoMoE trains a single shared expert (or the dense FFN) first, then *spawns* the E experts of an
MoE layer from it and continues training with the Dense-to-Sparse gate (router ``"dts"``). Each
spawned expert is the shared expert with a random binary mask applied to its weights,
``theta_i = theta * M_i``, so the experts start from the trained solution but differ, and the
gate has something to tell apart. Optional Gaussian noise perturbs the copies further.

With ``mask_ratio = 0`` and ``noise_std = 0`` every copy equals the base expert, so an MoE whose
gate weights sum to 1 for every token reproduces the base expert's output exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_range
from ..routing import Router
from .activations import ELEMENTWISE, builtin_name
from .experts import BACKENDS, Experts
from .layer import MoE

MASK_UNITS = ("weight", "hidden")


def diversify_experts(
    experts_or_ffn: Experts | nn.Module,
    num_experts: int,
    mask_ratio: float = 0.5,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    mask_unit: str = "weight",
    activation: str | None = None,
    backend: str | None = None,
) -> Experts:
    """Spawn ``num_experts`` experts from one base expert (EvoMoE's expert-diversify).

    Args:
        experts_or_ffn: the base: an :class:`~xmoe.moe.experts.Experts` with ``num_experts == 1``,
            or a dense FFN module with ``.fc`` (``nn.Linear`` d_model -> d_ff) and ``.proj``
            (``nn.Linear`` d_ff -> d_model) computing ``proj(act(fc(x)))`` (like
            ``xmoe.models.gpt.DenseFFN``; a missing bias becomes a zero bias).
        num_experts: E >= 1, the number of copies.
        mask_ratio: fraction of each copy's masked entries, in [0, 1). Default 0.5 (the EvoMoE
            recipe's default here, ``model.moe.evo.mask_ratio``): large enough that the copies
            differ clearly, each keeping half of the base. Masks are independent per copy.
        noise_std: std of Gaussian noise added to every parameter of each copy (after masking),
            >= 0. Default 0.0: EvoMoE diversifies by masking only.
        generator: CPU ``torch.Generator`` for the masks and the noise (reproducible spawning).
        mask_unit: what a mask entry zeroes. ``"weight"`` (default, EvoMoE's ``theta * M``): each
            entry of the weight matrices ``w1``, ``w2`` (and ``w3``) independently with
            probability ``mask_ratio``; biases are kept. ``"hidden"``: exactly
            ``round(mask_ratio * d_expert)`` hidden units per copy (their ``w1``/``w3`` columns,
            ``b1``/``b3`` entries and ``w2`` rows), so each copy is a sub-network of the base.
        activation: the FFN's activation when it cannot be read from ``ffn.act`` (one of
            ``"gelu"``, ``"relu"``, ``"silu"``). Ignored for an Experts base.
        backend: expert backend of the result. Default: the base Experts' backend, else "auto".

    Returns:
        ``Experts`` with ``w1: [E, d_model, d_expert]``, ``w2: [E, d_expert, d_model]`` (and
        ``b1``, ``b2``, ``w3``, ``b3`` as the base has them), on the base's device and dtype.

    Raises:
        ValueError: a bad option, an Experts base with more than one expert, or an FFN base
            whose shape or activation is not supported.
    """
    check_int("num_experts", num_experts, 1)
    check_range("mask_ratio", mask_ratio, 0.0, 1.0, high_open=True)
    check_range("noise_std", noise_std, 0.0, math.inf)
    check_choice("mask_unit", mask_unit, MASK_UNITS)
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    base, spec = _base_tensors(experts_or_ffn, activation)
    d_model, d_expert = base["w1"].shape
    out = Experts(
        num_experts,
        d_model,
        d_expert,
        spec["activation"],
        spec["bias"],
        backend or spec["backend"],
    ).to(device=base["w1"].device, dtype=base["w1"].dtype)
    masks = _masks(base, num_experts, mask_ratio, mask_unit, generator)
    with torch.no_grad():
        for name, value in base.items():
            copies = value.unsqueeze(0).expand(num_experts, *value.shape).clone()
            if name in masks:
                copies.mul_(masks[name].to(device=copies.device, dtype=copies.dtype))
            if noise_std > 0:
                noise = torch.randn(copies.shape, generator=generator, dtype=torch.float32)
                copies.add_(noise.to(device=copies.device, dtype=copies.dtype) * noise_std)
            getattr(out, name).copy_(copies)
    return out


def spawn_moe(
    base: Experts | nn.Module,
    d_model: int,
    num_experts: int,
    router: str | Router = "dts",
    mask_ratio: float = 0.5,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    mask_unit: str = "weight",
    activation: str | None = None,
    capacity_factor: float | str | None = None,
    eval_capacity_factor: float | str | None = None,
    backend: str | None = None,
    **router_options,
) -> MoE:
    """An MoE layer whose experts are spawned from ``base`` by :func:`diversify_experts`.

    Args:
        base: the single expert or dense FFN to spawn from (see :func:`diversify_experts`).
        d_model: the layer width; must match the base.
        num_experts: E.
        router: router name (default ``"dts"``, EvoMoE's Dense-to-Sparse gate) or instance.
        mask_ratio, noise_std, generator, mask_unit, activation: see :func:`diversify_experts`.
        capacity_factor, eval_capacity_factor: see :class:`~xmoe.MoE`.
        backend: expert backend (default: the base Experts' backend, else "auto").
        **router_options: passed to the router (with a router name), e.g. ``tau_start=2.0``.

    Returns:
        An :class:`~xmoe.MoE` with ``d_expert`` and activation / bias taken from the base.
    """
    experts = diversify_experts(
        base,
        num_experts,
        mask_ratio,
        noise_std,
        generator,
        mask_unit=mask_unit,
        activation=activation,
        backend=backend,
    )
    if experts.d_model != d_model:
        raise ValueError(f"base expert has d_model={experts.d_model}, expected d_model={d_model}")
    moe = MoE(
        d_model,
        num_experts,
        experts.d_expert,
        router=router,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        experts=experts,
        **router_options,
    )
    return moe.to(device=experts.w1.device)


def _base_tensors(base: Experts | nn.Module, activation: str | None) -> tuple[dict, dict]:
    """The base expert's tensors as one expert's slices (``w1 [d, h]``, ``w2 [h, d]``, ...)."""
    if isinstance(base, Experts):
        if base.num_experts != 1:
            raise ValueError(
                f"the base Experts must hold num_experts=1, got num_experts={base.num_experts}"
            )
        names = ("w1", "w2", "w3", "b1", "b2", "b3")
        tensors = {n: getattr(base, n)[0].detach() for n in names if getattr(base, n) is not None}
        spec = {"activation": base.activation, "bias": base.b1 is not None, "backend": base.backend}
        return tensors, spec
    fc, proj = getattr(base, "fc", None), getattr(base, "proj", None)
    if not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)):
        raise ValueError(
            "the base must be an Experts with num_experts=1 or a dense FFN with nn.Linear "
            f"'.fc' and '.proj', got {type(base).__name__}"
        )
    if proj.in_features != fc.out_features or proj.out_features != fc.in_features:
        raise ValueError(
            f"dense FFN shapes do not chain: fc {fc.in_features}->{fc.out_features}, "
            f"proj {proj.in_features}->{proj.out_features}"
        )
    act = activation if activation is not None else builtin_name(getattr(base, "act", None))
    check_choice("activation", act, tuple(ELEMENTWISE))
    w1, w2 = fc.weight.detach().t(), proj.weight.detach().t()
    tensors = {"w1": w1, "w2": w2}
    bias = fc.bias is not None or proj.bias is not None
    if bias:
        tensors["b1"] = fc.bias.detach() if fc.bias is not None else w1.new_zeros(w1.shape[1])
        tensors["b2"] = proj.bias.detach() if proj.bias is not None else w2.new_zeros(w2.shape[1])
    return tensors, {"activation": act, "bias": bias, "backend": "auto"}


def _masks(
    base: dict[str, Tensor],
    num_experts: int,
    ratio: float,
    unit: str,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """Per-copy multiplicative masks ``[E, *shape]`` (CPU, fp32 0/1) for the masked tensors."""
    if ratio == 0:
        return {}
    if unit == "weight":
        return {
            name: (
                torch.rand((num_experts, *base[name].shape), generator=generator) >= ratio
            ).float()
            for name in ("w1", "w2", "w3")
            if name in base
        }
    d_expert = base["w1"].shape[1]
    n_masked = round(ratio * d_expert)
    keep = torch.ones(num_experts, d_expert)
    for e in range(num_experts):
        keep[e, torch.randperm(d_expert, generator=generator)[:n_masked]] = 0.0
    masks = {"w1": keep.unsqueeze(1), "w2": keep.unsqueeze(2), "b1": keep}  # broadcast shapes
    if "w3" in base:
        masks.update({"w3": keep.unsqueeze(1), "b3": keep})
    return {
        name: m.expand(num_experts, *base[name].shape) for name, m in masks.items() if name in base
    }
