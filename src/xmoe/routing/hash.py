"""Hash layers (Roller et al., 2021): a fixed, unlearned map from token id to expert."""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from .._checks import check_int
from .base import Router, Routing

BALANCES = ("random", "frequency")


class HashRouter(Router):
    """Route each token by its *input token id* through a fixed table ``[vocab_size] -> expert``.

    Every token gets exactly one expert with weight 1; the router has no parameters, no losses
    and no gradient. The layer must be called with ``token_ids`` (the GPT passes them).

    Args:
        vocab_size: size of the token-id space (the GPT fills it in from its config).
        balance: ``"random"``: a random balanced table (every expert gets vocab/E ids);
            ``"frequency"``: ids are assigned greedily, most frequent first, to the expert with
            the least total frequency so far (call :meth:`fit_frequencies` with corpus counts;
            until then the table is the random one).
        seed: seed of the random table.
    """

    uses_token_ids = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        vocab_size: int,
        balance: str = "random",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("num_experts", num_experts, 1)
        check_int("vocab_size", vocab_size, 1)
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.d_model, self.num_experts, self.vocab_size = d_model, num_experts, vocab_size
        self.balance = balance
        g = torch.Generator().manual_seed(seed)
        table = torch.empty(vocab_size, dtype=torch.long)
        table[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size) % num_experts
        self.register_buffer("table", table)

    @torch.no_grad()
    def fit_frequencies(self, counts: Tensor) -> None:
        """Frequency-balanced table from ``counts: [vocab_size]`` token counts (LPT greedy).

        A no-op unless ``balance="frequency"``.
        """
        if self.balance != "frequency":
            return
        if counts.shape != (self.vocab_size,):
            raise ValueError(
                f"counts must have shape [{self.vocab_size}], got {tuple(counts.shape)}"
            )
        order = torch.argsort(counts.double(), descending=True, stable=True).tolist()
        heap = [(0.0, e) for e in range(self.num_experts)]
        table = torch.empty(self.vocab_size, dtype=torch.long)
        values = counts.double().tolist()
        for tok in order:
            load, e = heapq.heappop(heap)
            table[tok] = e
            heapq.heappush(heap, (load + values[tok], e))
        self.table.copy_(table)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, **kwargs) -> Routing:
        n = x.shape[0]
        if token_ids is None:
            raise ValueError("the hash router needs token_ids: call moe(x, token_ids=ids)")
        token_ids = token_ids.reshape(-1)
        if token_ids.numel() != n:
            raise ValueError(f"token_ids must have one id per token ({n}), got {token_ids.numel()}")
        if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise ValueError(f"token_ids must be in [0, vocab_size={self.vocab_size})")
        ones = torch.ones(n, dtype=torch.float32, device=x.device)
        return Routing(
            token_idx=torch.arange(n, device=x.device),
            expert_idx=self.table[token_ids],
            weight=ones,
            rank=torch.zeros(n, dtype=torch.long, device=x.device),
            score=ones,
            num_tokens=n,
            num_experts=self.num_experts,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, vocab_size={self.vocab_size}, "
            f"balance={self.balance!r}"
        )
