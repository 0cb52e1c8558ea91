"""Exit policies at test time: JEI-DNN's gate rule and the baselines, on the same heads.

Every policy maps exit logits ``[N, L, C]`` (and gates, for JEI-DNN) to an exit index ``[N]``;
:func:`exit_probs` then reads the prediction at that exit. The predictive distribution is the
softmax of the exit's own IM. For JEI-DNN it carries no thresholding bias: the IM at l was
trained on the inputs weighted by how likely they leave at l, which is the population that
leaves there at test time; a confidence threshold instead keeps exactly the inputs whose
probability happened to be high, so its kept probabilities are biased upwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int, check_range
from .distribution import exit_distribution, first_exit_where, test_time_exit


def jei_exit(gates: Tensor, threshold: float = 0.5) -> Tensor:
    """JEI-DNN: the first exit whose conditional exit probability exceeds 0.5."""
    return test_time_exit(gates, threshold)


def confidence_exit(logits: Tensor, tau: float) -> Tensor:
    """The first exit whose max probability is ``>= tau`` (the last otherwise)."""
    check_range("tau", tau, 0.0, 1.0)
    return first_exit_where(logits.float().softmax(-1).amax(-1) >= tau)


def entropy_exit(logits: Tensor, tau: float) -> Tensor:
    """The first exit whose normalised entropy ``H(p) / log C`` is ``<= tau``."""
    check_range("tau", tau, 0.0, 1.0)
    logp = logits.float().log_softmax(-1)
    h = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return first_exit_where(h <= tau)


def fixed_exit(num: int, exit_index: int, num_exits: int) -> Tensor:
    """Every input at exit ``exit_index`` (the last layer only: ``num_exits - 1``)."""
    check_int("exit_index", exit_index, 0, num_exits - 1)
    return torch.full((num,), exit_index, dtype=torch.long)


def exit_probs(logits: Tensor, exits: Tensor) -> Tensor:
    """``[N, C]`` predictive distribution: the softmax of each input's exit IM."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, exits].float().softmax(-1)


def mixture_probs(logits: Tensor, gates: Tensor) -> Tensor:
    """``[N, C]`` ``sum_l pi_l p_l``: the exit-marginal predictive distribution (needs every
    exit, so it is a reference, not a deployable predictor)."""
    pi = exit_distribution(gates)
    return (pi[:, :, None] * logits.float().softmax(-1)).sum(1)
