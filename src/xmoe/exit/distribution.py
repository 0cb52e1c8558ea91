"""The JEI-DNN exit distribution, the oracle exit and the test-time rule.

Notation (Regol, Chataoui and Coates, 2023): an input passes exits 1..L in order. At exit l the
gate gives ``g_l``, the probability of leaving there given that the input reached l. The last
exit always takes what is left (``g_L = 1``). The probability of leaving exactly at l is

    pi_l = g_l * prod_{j<l} (1 - g_j),           sum_l pi_l = 1.

The oracle exit of a training input is the cheapest exit minimising its IM loss plus ``lam``
times the cost of reaching that exit; the gates learn to reproduce it. At test time the input
leaves at the first exit whose gate exceeds ``threshold`` (0.5), i.e. where leaving is more
likely than going on.

Shapes: ``N`` inputs (or tokens), ``L`` exits. Indices are 0-based (exit 0 is the first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_range


def exit_distribution(gates: Tensor) -> Tensor:
    """``pi: [N, L]`` from conditional exit probabilities ``gates: [N, L]`` (the last column is
    ignored and taken as 1). Computed in log space, so long chains of small gates stay exact."""
    if gates.dim() != 2 or gates.shape[1] < 1:
        raise ValueError(f"gates must be [N, L] with L >= 1, got {tuple(gates.shape)}")
    g = gates.float().clamp(0.0, 1.0)
    g = torch.cat([g[:, :-1], torch.ones_like(g[:, -1:])], dim=1)
    stay = torch.log1p(-g[:, :-1].clamp(max=1.0 - 1e-7))  # log(1 - g_j), j < L
    reach = torch.cat([torch.zeros_like(g[:, :1]), stay.cumsum(1)], dim=1)  # log prod_{j<l}
    return g * reach.exp()


def oracle_exit(losses: Tensor, costs: Tensor, lam: float) -> Tensor:
    """``[N]`` index of the cheapest exit minimising ``losses + lam * costs``.

    ``losses: [N, L]`` per-input IM losses; ``costs: [L]`` or ``[N, L]``, non-decreasing in l.
    Ties go to the earliest (cheapest) exit.
    """
    check_range("lam", lam, 0.0, float("inf"))
    if losses.dim() != 2:
        raise ValueError(f"losses must be [N, L], got {tuple(losses.shape)}")
    total = losses.float() + lam * costs.float().expand_as(losses)
    best = total.min(dim=1, keepdim=True).values
    # torch.argmin's tie order is not documented: take the first index attaining the minimum
    hit = total <= best
    return hit.float().argmax(dim=1)


def gate_targets(oracle: Tensor, num_exits: int) -> tuple[Tensor, Tensor]:
    """Targets and mask ``[N, L]`` for the gates, from oracle exits ``[N]``.

    An input reaches exits 0..oracle: the gates before its oracle exit must say "go on" (0),
    the gate at it "leave" (1). Gates after the oracle exit are never reached and are masked;
    the last exit has no gate (always masked).
    """
    pos = torch.arange(num_exits, device=oracle.device)[None, :]
    o = oracle[:, None]
    targets = (pos == o).float()
    mask = (pos <= o) & (pos < num_exits - 1)
    return targets, mask.float()


def test_time_exit(gates: Tensor, threshold: float = 0.5) -> Tensor:
    """``[N]`` first exit whose gate is ``> threshold``; the last exit when none is."""
    check_range("threshold", threshold, 0.0, 1.0)
    leave = gates > threshold
    leave[:, -1] = True
    return leave.float().argmax(dim=1)


def first_exit_where(leave: Tensor) -> Tensor:
    """``[N]`` first True column of ``leave: [N, L]``; the last column when there is none."""
    leave = leave.clone()
    leave[:, -1] = True
    return leave.float().argmax(dim=1)
