"""The key/value cache that makes generation cost one token per step instead of the context.

One preallocated ``[B, H, block_size, head_dim]`` buffer pair per attention layer; a forward
with a cache writes its T new keys/values at ``[length, length + T)`` and attends to
``[0, length + T)``. :meth:`GPT.generate <xmoe.models.GPT.generate>` owns one per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    keys: list[Tensor]  # per layer [B, H, capacity, head_dim]
    values: list[Tensor]
    length: int = 0  # tokens cached (the positions of the next tokens start here)

    @classmethod
    def empty(
        cls,
        n_layer: int,
        batch: int,
        n_head: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (batch, n_head, capacity, head_dim)
        new = lambda: torch.empty(shape, dtype=dtype, device=device)
        return cls([new() for _ in range(n_layer)], [new() for _ in range(n_layer)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v: [B, H, T, head_dim]`` after the cached tokens; returns all keys and
        values ``[B, H, length + T, head_dim]`` (views). ``length`` moves in :meth:`advance`."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise ValueError(
                f"KV cache holds {self.capacity} tokens; {self.length} cached + {T} new exceed it"
            )
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        """Called once per model forward, after every layer appended its ``tokens`` new ones."""
        self.length += tokens
