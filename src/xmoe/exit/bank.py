"""A bank of exit models on the same frozen features: one JEI-DNN member per cost trade-off
``lam`` and one baseline member (IMs only, trained with the plain sum of the exit losses, the
usual recipe before confidence thresholding). Training them side by side in one run gives the
whole accuracy-cost curve from one pass over the data.

The schedule: ``warmup`` IM-only steps with uniform weights (untrained gates would otherwise
starve the late IMs), then blocks of ``alternate_every`` steps, GM first, then IM, repeating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_int
from .heads import ExitHeads
from .objective import exit_losses, jei_losses


@dataclass
class BankConfig:
    d: int
    num_classes: int
    num_exits: int
    lambdas: tuple[float, ...]
    im_kind: str = "linear"
    im_hidden: int = 256
    gate_hidden: int = 16
    mix: float = 0.1
    pos_weight: float = 1.0
    warmup: int = 200
    alternate_every: int = 50


def phase_at(step: int, warmup: int, alternate_every: int) -> str:
    """``"warmup"``, ``"gm"`` or ``"im"``: what the bank trains at ``step``."""
    check_int("step", step, 0)
    if step < warmup:
        return "warmup"
    return "gm" if ((step - warmup) // alternate_every) % 2 == 0 else "im"


class ExitBank(nn.Module):
    def __init__(self, cfg: BankConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def heads(gates: bool) -> ExitHeads:
            return ExitHeads(
                cfg.d, cfg.num_classes, cfg.num_exits, cfg.im_kind, cfg.im_hidden,
                cfg.gate_hidden, gates=gates,
            )  # fmt: skip

        self.baseline = heads(gates=False)
        self.members = nn.ModuleList(heads(gates=True) for _ in cfg.lambdas)

    def loss(self, h: Tensor, labels: Tensor, costs: Tensor, step: int) -> tuple[Tensor, dict]:
        """The loss to backpropagate at ``step`` and values to log.

        ``h: [N, L, d]`` features, ``labels: [N]``, ``costs: [L]`` or ``[N, L]`` normalised cost
        of leaving at each exit. Only the level being trained carries gradients, so the other
        level's parameters get none (AdamW skips them).
        """
        c = self.cfg
        phase = phase_at(step, c.warmup, c.alternate_every)
        values: dict[str, Tensor] = {}
        total = h.new_zeros(())
        if phase != "gm":
            base = exit_losses(self.baseline(h).logits, labels)
            total = total + base.mean(1).mean()
            values["baseline_loss"] = base[:, -1].mean().detach()
        im_sum, gm_sum, depth = h.new_zeros(()), h.new_zeros(()), h.new_zeros(())
        for lam, member in zip(c.lambdas, self.members):
            out = member(h)
            if phase == "warmup":
                im = exit_losses(out.logits, labels).mean(1).mean()
                gm = torch.zeros((), device=h.device)
            else:
                im, gm, oracle = jei_losses(out, labels, costs, lam, c.mix, c.pos_weight)
                depth = depth + oracle.float().mean() / len(self.members)
            im_sum, gm_sum = im_sum + im, gm_sum + gm
        total = total + (gm_sum if phase == "gm" else im_sum)
        values["im_loss"] = im_sum.detach() / max(len(self.members), 1)
        values["gm_loss"] = gm_sum.detach() / max(len(self.members), 1)
        values["oracle_exit"] = depth.detach()
        return total, values
