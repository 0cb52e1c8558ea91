"""The cost of leaving at each exit: layers executed and FLOPs (backbone, IMs and gates).

A multiply-add counts 2 FLOPs. An input that leaves at exit l has run layers 1..l, the IMs of
exits 1..l (each IM is needed to compute that exit's gate features) and the gates of exits
1..l (the last exit has no gate). Baselines without gates pay the IMs only.
"""

from __future__ import annotations

from torch import Tensor

from .features import NUM_FEATURES


def encoder_layer_flops(tokens: Tensor | float, d: int, d_ff: int) -> Tensor | float:
    """A BERT-style layer on ``tokens`` tokens: QKV + output projections, the two FFN GEMMs,
    and the attention scores and weighted sum (``2 * 2 * T^2 * d``)."""
    return 2 * tokens * (4 * d * d + 2 * d * d_ff) + 4 * tokens * tokens * d


def im_flops(d: int, num_classes: int, kind: str, hidden: int) -> float:
    """One IM: LayerNorm (~8 d) and its linear (or two-layer MLP) head, plus the softmax."""
    head = 2 * d * num_classes if kind == "linear" else 2 * (d * hidden + hidden * num_classes)
    return 8 * d + head + 5 * num_classes


def gate_flops(hidden: int, num_classes: int) -> float:
    """One gate: its features (top-2, entropy over C classes) and its MLP."""
    return 6 * num_classes + 2 * (NUM_FEATURES * hidden + hidden)


def cumulative(per_exit: Tensor) -> Tensor:
    """``[..., L]`` cost of leaving at each exit from per-exit costs ``[..., L]``."""
    return per_exit.cumsum(-1)
