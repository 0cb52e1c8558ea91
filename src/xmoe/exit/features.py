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
def gate_features(logits: Tensor) -> Tensor:
    """``[..., L, F]`` gate features from exit logits ``[..., L, C]`` (``C >= 2``)."""
    z = logits.detach().float()
    L, C = z.shape[-2], z.shape[-1]
    if C < 2:
        raise ValueError(f"gate features need at least 2 classes, got {C}")
    logp = z.log_softmax(-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    maxp, margin = top2[..., 0], top2[..., 0] - top2[..., 1]
    entropy = -(p * logp).sum(-1) / math.log(C)
    arg = z.argmax(-1)
    agree = torch.zeros_like(maxp)
    gain = torch.zeros_like(maxp)
    if L > 1:
        agree[..., 1:] = (arg[..., 1:] == arg[..., :-1]).float()
        gain[..., 1:] = maxp[..., 1:] - maxp[..., :-1]
    position = torch.arange(L, device=z.device, dtype=z.dtype) / max(L - 1, 1)
    position = position.expand_as(maxp)
    return torch.stack([maxp, entropy, margin, agree, gain, position], dim=-1)
