"""Intermediate inference modules (IMs) and gating modules (GMs) over per-exit features.

:class:`ExitHeads` holds one IM per exit and one gate per exit but the last (which always
takes the inputs that are left). IM: LayerNorm + Linear (``kind="linear"``) or LayerNorm +
Linear-GELU-Linear (``kind="mlp"``). Gate: a small MLP on :func:`~.features.gate_features`
(detached), giving a logit whose sigmoid is the conditional exit probability ``g_l``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from .features import NUM_FEATURES, gate_features

IM_KINDS = ("linear", "mlp")


class InferenceModule(nn.Module):
    """``[N, d] -> [N, C]`` logits."""

    def __init__(self, d: int, num_classes: int, kind: str = "linear", hidden: int = 256) -> None:
        super().__init__()
        check_choice("kind", kind, IM_KINDS)
        self.norm = nn.LayerNorm(d)
        if kind == "linear":
            self.body: nn.Module = nn.Linear(d, num_classes)
        else:
            self.body = nn.Sequential(
                nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
            )

    def forward(self, h: Tensor) -> Tensor:
        return self.body(self.norm(h))


class Gate(nn.Module):
    """``[N, F]`` gate features -> ``[N]`` exit logits (a one-hidden-layer MLP)."""

    def __init__(self, num_features: int = NUM_FEATURES, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f).squeeze(-1)


@dataclass
class ExitOutput:
    logits: Tensor  # [N, L, C] IM logits
    gate_logits: Tensor  # [N, L] (the last column is +inf: the last exit takes everything)

    @property
    def gates(self) -> Tensor:
        """``[N, L]`` conditional exit probabilities g_l (last column 1)."""
        return torch.sigmoid(self.gate_logits)


class ExitHeads(nn.Module):
    """IMs and gates for ``num_exits`` exits over features ``h: [N, L, d]``."""

    def __init__(
        self,
        d: int,
        num_classes: int,
        num_exits: int,
        im_kind: str = "linear",
        im_hidden: int = 256,
        gate_hidden: int = 16,
        gates: bool = True,
    ) -> None:
        super().__init__()
        check_int("num_exits", num_exits, 1)
        check_int("num_classes", num_classes, 2)
        self.num_exits = num_exits
        self.ims = nn.ModuleList(
            InferenceModule(d, num_classes, im_kind, im_hidden) for _ in range(num_exits)
        )
        n_gates = num_exits - 1 if gates else 0
        self.gates = nn.ModuleList(Gate(NUM_FEATURES, gate_hidden) for _ in range(n_gates))

    @property
    def has_gates(self) -> bool:
        return len(self.gates) == self.num_exits - 1

    def forward(self, h: Tensor) -> ExitOutput:
        if h.dim() != 3 or h.shape[1] != self.num_exits:
            raise ValueError(f"h must be [N, {self.num_exits}, d], got {tuple(h.shape)}")
        logits = torch.stack([im(h[:, i]) for i, im in enumerate(self.ims)], dim=1)
        gate_logits = torch.full(logits.shape[:2], float("inf"), device=h.device)
        if self.has_gates:
            f = gate_features(logits)
            cols = [gate(f[:, i]) for i, gate in enumerate(self.gates)]
            gate_logits = torch.cat([torch.stack(cols, 1), gate_logits[:, -1:]], dim=1)
        return ExitOutput(logits, gate_logits)
