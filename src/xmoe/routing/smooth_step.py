"""Smooth-step activation and helpers shared by the learned sparse gates (DSelect-k, COMET).

The smooth-step (Hazimeh et al., 2020/2021) is a cubic that reaches exactly 0 and exactly 1 at
finite inputs, so a product of smooth-steps can put *exactly* zero weight on an expert while
staying continuously differentiable. The gates built on it turn their dense ``[N, E]`` weights
into ragged pairs with :func:`routing_from_dense`, keeping only the entries that are > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive
from .base import Routing, pairs_from_sorted


def check_gamma(gamma: float) -> float:
    """``gamma`` must be a finite number > 0; returns it as a float."""
    return float(check_positive("gamma", gamma))


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The smooth-step ``S_gamma(t)``, elementwise.

    ``0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2`` and ``-2 t^3 / gamma^3 + 3 t /
    (2 gamma) + 1/2`` in between. It is C^1 (the cubic's slope is 0 at both ends, ``3 / (2 gamma)``
    at 0) and symmetric: ``S(-t) = 1 - S(t)``.

    The cubic is evaluated in the factored form ``2 (u + 1/2)^2 (1 - u)`` with ``u = t / gamma``
    (the same polynomial: it has a double root at ``u = -1/2`` and value 1 at ``u = 1/2``), which
    is >= 0 without cancellation near ``-gamma/2``; the result is clamped to [0, 1] against
    rounding. The two flat regions return exact 0 and 1 with zero gradient.

    Args:
        t: any shape, floating point.
        gamma: width of the fractional region, > 0.
    Returns:
        same shape and dtype as ``t``.
    """
    gamma = check_gamma(gamma)
    u = t / gamma
    cubic = (2.0 * (u + 0.5).square() * (1.0 - u)).clamp(0.0, 1.0)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    return torch.where(t <= -gamma / 2, zeros, torch.where(t >= gamma / 2, ones, cubic))


def num_code_bits(num_experts: int) -> int:
    """``ceil(log2 E)`` computed exactly on integers (0 for E = 1)."""
    return (num_experts - 1).bit_length()


def check_init_scale(name: str, init_scale: float | None, default: float) -> float:
    """``None`` → ``default``; otherwise a finite number > 0 (the error names ``name``)."""
    if init_scale is None:
        return default
    return float(check_positive(name, init_scale))


def fp32_linears(x: Tensor, *weights: Tensor, check_finite: bool = True) -> list[Tensor]:
    """``x @ W.T`` for each weight, in fp32 outside autocast (``x: [N, d]`` → ``[N, rows]``).

    Raises ``ValueError`` (one host sync for all outputs) when ``check_finite`` and any output
    holds NaN or inf, like :meth:`LinearRouter.logits`.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        outs = [F.linear(xf, w.float()) for w in weights]
    if check_finite and outs:
        finite = torch.stack([torch.isfinite(o).all() for o in outs]).all()
        if not bool(finite):
            raise ValueError(
                "router scores contain NaN or inf: the MoE input x (or the router weight) is not "
                "finite; expected finite values"
            )
    return outs


def routing_from_dense(weights: Tensor) -> Routing:
    """Ragged pairs from dense combine weights ``[N, E]`` (fp32, >= 0, differentiable).

    Only entries with weight > 0 become pairs. ``rank`` is the expert's position among the
    token's kept experts by descending weight (ties: lower expert index first); ``score`` is the
    detached weight. Pairs come out token-major, rank-minor.
    """
    order = weights.detach().argsort(dim=-1, descending=True, stable=True)
    ranked = weights.gather(1, order)
    keep = ranked.detach() > 0
    return pairs_from_sorted(ranked, order, keep, weights.shape[-1])


def token_mean(values: Tensor) -> Tensor:
    """Mean of a per-token ``[N]`` tensor; 0 (keeping the graph) when N == 0."""
    if values.shape[0] == 0:
        return values.sum() * 0.0
    return values.mean()


def entropy_rows(probs: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim (0 log 0 = 0, finite gradients at p = 0)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)
