"""What a gate sees: detached summary features of its exit's prediction.

Per exit l, from the IM's logits (and the previous exit's, for the agreement features):

| feature | why |
|---|---|
| max probability | the confidence thresholding baselines use |
| normalised entropy H(p) / log C | the entropy thresholding baselines use |
| margin p(1) - p(2) | separates a confident call from a near tie |
| agreement with exit l-1's argmax | a settled prediction rarely changes later (PABEE) |
| max prob gain over exit l-1 | whether going deeper is still paying off |
| exit position l / (L - 1) | lets one gate shape share a cost schedule |

Everything is computed under ``no_grad`` from detached logits: the gates learn from the oracle
targets only, never through the IMs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_FEATURES = 6


@torch.no_grad()
def gate_features_at(logits: Tensor, prev: Tensor | None, position: float) -> Tensor:
    """``[..., F]`` features of one exit from its logits ``[..., C]`` and the previous exit's
    (``None`` at the first exit: agreement and gain are 0); ``position`` is l / (L - 1)."""
    z = logits.detach().float()
    C = z.shape[-1]
    if C < 2:
        raise ValueError(f"gate features need at least 2 classes, got {C}")
    logp = z.log_softmax(-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    maxp, margin = top2[..., 0], top2[..., 0] - top2[..., 1]
    entropy = -(p * logp).sum(-1) / math.log(C)
    agree = torch.zeros_like(maxp)
    gain = torch.zeros_like(maxp)
    if prev is not None:
        q = prev.detach().float()
        agree = (z.argmax(-1) == q.argmax(-1)).float()
        gain = maxp - q.softmax(-1).amax(-1)
    pos = torch.full_like(maxp, position)
    return torch.stack([maxp, entropy, margin, agree, gain, pos], dim=-1)


@torch.no_grad()
def gate_features(logits: Tensor) -> Tensor:
    """``[..., L, F]`` gate features from the exit logits ``[..., L, C]`` of every exit."""
    L = logits.shape[-2]
    cols = [
        gate_features_at(logits[..., i, :], logits[..., i - 1, :] if i else None, i / max(L - 1, 1))
        for i in range(L)
    ]
    return torch.stack(cols, dim=-2)
