"""Expert Choice routing (Zhou et al., 2022): experts pick their top tokens."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._checks import check_positive
from .base import LinearRouter, Routing
from .losses import z_loss

LEAK_WARNING = (
    "expert_choice routing selects tokens by comparing them across the whole batch, so in a "
    "causal LM a token's routing depends on later positions at training time (information leaks "
    "from the future) and eval output depends on batch composition."
)


class ExpertChoiceRouter(LinearRouter):
    """Each expert takes its ``ceil(c * N / E)`` highest-scoring tokens (``S = softmax(logits)``).

    A token may get 0 or several experts; every expert gets exactly its quota (capped at N), so
    load is perfectly balanced and no balancing loss is needed (only the z-loss is reported).

    Warning: selection compares tokens across the batch. In causal LMs this leaks information
    from future positions at training time, and eval output depends on batch composition.

    Args:
        expert_capacity: c, tokens per expert as a multiple of N/E. Default 2 (the paper's).
        **kwargs: see :class:`LinearRouter`.
    """

    def __init__(self, d_model: int, num_experts: int, *, expert_capacity: float = 2.0, **kwargs):
        super().__init__(d_model, num_experts, **kwargs)
        check_positive("expert_capacity", expert_capacity)
        self.expert_capacity = float(expert_capacity)
        warnings.warn(LEAK_WARNING, stacklevel=3)

    def quota(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.expert_capacity * num_tokens / self.num_experts))

    def select(self, probs: Tensor) -> Routing:
        n, e = probs.shape
        quota = self.quota(n)
        _, tokens = probs.detach().topk(quota, dim=0)  # [quota, E]
        token_idx = tokens.T.reshape(-1)
        expert_idx = torch.arange(e, device=probs.device).repeat_interleave(quota)
        # rank = the expert's position in the token's own preference order
        token_rank = torch.argsort(torch.argsort(probs.detach(), dim=1, descending=True), dim=1)
        weight = probs[token_idx, expert_idx]
        return Routing(
            token_idx=token_idx,
            expert_idx=expert_idx,
            weight=weight,
            rank=token_rank[token_idx, expert_idx],
            score=weight.detach(),
            num_tokens=n,
            num_experts=e,
        )

    def standard_losses(self, logits: Tensor, probs: Tensor, routing: Routing) -> dict[str, Tensor]:
        """Only the z-loss: the load is balanced by construction (no batch statistics, so
        ``reduce_stats`` is not used; selection stays within each rank's tokens)."""
        return {"z_loss": z_loss(logits)}
