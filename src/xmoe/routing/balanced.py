"""BASE layers (Lewis et al., 2021): balanced assignment in training, greedy top-1 at eval."""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import SOLVERS, balanced_assignment
from .base import LinearRouter, Routing


class BalancedAssignmentRouter(LinearRouter):
    """BASE: each token goes to one expert, and in training every expert gets the same number
    of tokens (floor/ceil of N/E) with the total score ``sum_i x_i . w_e(i)`` maximised.

    Eval routes each token greedily to its top-1 expert. The combine weight is
    ``sigmoid(x . w_e)``; there is no auxiliary loss.

    Args:
        assignment: ``"auto"`` (exact Hungarian for N <= 256, auction above), ``"hungarian"``,
            ``"auction"`` or ``"sinkhorn"`` (S-BASE: approximate balance).
        sinkhorn_iters: Sinkhorn iterations for ``"sinkhorn"``. Default 8.
        **kwargs: see :class:`LinearRouter`.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        assignment: str = "auto",
        sinkhorn_iters: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        if assignment not in SOLVERS:
            raise ValueError(f"assignment must be one of {SOLVERS}, got {assignment!r}")
        self.assignment = assignment
        self.sinkhorn_iters = sinkhorn_iters

    def forward(self, x: Tensor, **kwargs) -> Routing:
        logits = self.logits(x)
        n = logits.shape[0]
        if self.training:
            expert = balanced_assignment(
                logits, self.assignment, sinkhorn_iters=self.sinkhorn_iters
            )
        else:
            expert = logits.argmax(dim=-1)
        token_idx = torch.arange(n, device=x.device)
        chosen = logits[token_idx, expert]
        rank = (logits > chosen.detach().unsqueeze(1)).sum(dim=1)
        weight = torch.sigmoid(chosen)
        return Routing(
            token_idx=token_idx,
            expert_idx=expert,
            weight=weight,
            rank=rank,
            score=weight.detach(),
            num_tokens=n,
            num_experts=self.num_experts,
        )
