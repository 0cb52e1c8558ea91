"""The JEI-DNN training objective: exit-weighted IM losses and oracle-supervised gates.

The two levels alternate (the paper's bi-level scheme):

- **IM step.** The gates are fixed; each IM is trained on the inputs in proportion to the
  probability that they leave there, ``sum_l pi_l(x) CE(p_l(x), y)``. ``mix`` blends in a
  uniform weight ``1/L`` so that an IM few inputs reach still learns (``mix=0``: the pure
  exit-weighted loss).
- **GM step.** The IMs are fixed; the oracle exit ``argmin_l CE_l + lam * cost_l`` of each input
  gives the gate targets (0 before it, 1 at it, nothing after), learnt by binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_range
from .distribution import exit_distribution, gate_targets, oracle_exit
from .heads import ExitOutput


def exit_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[N, L]`` per-input, per-exit cross-entropy from ``logits: [N, L, C]``, ``labels: [N]``."""
    N, L, C = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(N * L, C), labels.repeat_interleave(L), reduction="none"
    )
    return ce.view(N, L)


def im_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """Mean over inputs of ``sum_l weights[n, l] * losses[n, l]`` (weights are not trained)."""
    return (weights.detach() * losses).sum(1).mean()


def im_weights(gates: Tensor, mix: float) -> Tensor:
    """``(1 - mix) * pi + mix / L``: the IM loss weights from the (fixed) gates ``[N, L]``."""
    check_range("mix", mix, 0.0, 1.0)
    pi = exit_distribution(gates.detach())
    return (1.0 - mix) * pi + mix / gates.shape[1]


def gm_loss(gate_logits: Tensor, oracle: Tensor, pos_weight: float = 1.0) -> Tensor:
    """Binary cross-entropy of the reached gates against the oracle targets (mean over them)."""
    check_range("pos_weight", pos_weight, 0.0, float("inf"), low_open=True)
    L = gate_logits.shape[1]
    targets, mask = gate_targets(oracle, L)
    if L == 1 or mask.sum() == 0:
        return gate_logits[:, :0].sum()  # a zero that keeps the graph
    logits = gate_logits[:, :-1].float()
    weight = mask[:, :-1] * torch.where(targets[:, :-1] > 0, pos_weight, 1.0)
    bce = F.binary_cross_entropy_with_logits(
        logits, targets[:, :-1], weight=weight, reduction="sum"
    )
    return bce / mask[:, :-1].sum()


def jei_losses(
    out: ExitOutput, labels: Tensor, costs: Tensor, lam: float, mix: float, pos_weight: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(im_loss, gm_loss, oracle)`` of one batch; the caller backpropagates the level it
    trains. The oracle uses the IM losses detached."""
    losses = exit_losses(out.logits, labels)
    oracle = oracle_exit(losses.detach(), costs, lam)
    im = im_loss(losses, im_weights(out.gates, mix))
    gm = gm_loss(out.gate_logits, oracle, pos_weight)
    return im, gm, oracle
