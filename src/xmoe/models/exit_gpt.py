"""A GPT whose tokens may leave early: adaptive depth (JEI-DNN exits) on top of XMoE's
adaptive width.

- **Exits.** After every block but the last, an exit head: its own LayerNorm, then the GPT's
  tied embedding (``gpt.head``) as the output matrix. The last exit is the GPT's own
  ``ln_f`` + ``head``. Gates (one set per cost trade-off ``lam``) read the detached
  :func:`~xmoe.exit.features.gate_features_at` of each exit's prediction.
- **Keys and values of exited tokens (CALM's propagation).** A token that leaves at block l
  freezes its hidden state there. Later blocks still need its keys and values for the tokens
  after it: they compute them from the frozen state (their own ``ln1`` + K/V projection), and
  the token's attention and FFN are skipped. :meth:`ExitGPT.exit_forward` does this in one
  parallel pass (exited rows keep their state through ``torch.where``) or, with a
  :class:`KVCache`, one token at a time: both follow the same per-token decisions, so they give
  the same logits (tests/models/test_exit_gpt.py).
- **Cost per token** (the JEI-DNN cost): attention FLOPs (QKV + output projections, scores
  and weighted sum over the token's context) plus FFN FLOPs (the dense FFN, or the experts the
  router kept for that token, plus the router) for each block the token runs, and the K/V
  projections for each block after its exit.

Training runs every block on every token (as CALM and JEI-DNN do); exits act at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exit.features import NUM_FEATURES, gate_features_at
from ..exit.heads import Gate
from ..moe.layer import MoE
from .gpt import GPT, GPTConfig
from .kv_cache import KVCache


@dataclass
class ExitForward:
    logits: Tensor  # [B, T, V] the prediction at each token's exit
    exits: Tensor  # [B, T] 0-based block index where each token left
    flops: Tensor  # [B, T] FLOPs spent on each token (attention + FFN/experts + K/V after exit)


def attention_flops(d: int, context: Tensor) -> Tensor:
    """One block's attention for a token that sees ``context`` tokens: QKV and output
    projections (``2 * 4 d^2``) plus scores and weighted sum (``2 * 2 * context * d``)."""
    return 8 * d * d + 4 * context.double() * d


def ffn_flops(ffn: nn.Module, d: int, d_ff: int, experts: Tensor | None) -> Tensor | float:
    """One block's FFN FLOPs per token: dense (``2 * 2 d d_ff``) or, for an MoE, the kept
    experts ``experts: [B, T]`` (plus shared experts) and the router (``2 d E``)."""
    if isinstance(ffn, MoE):
        return ffn.expert_flops_per_token(experts.double()) + 2 * d * ffn.num_experts
    return 4.0 * d * d_ff


def experts_per_token(routing, shape: torch.Size) -> Tensor:
    """``[B, T]`` kept (token, expert) pairs per token of a block's routing."""
    counts = torch.bincount(routing.token_idx, minlength=shape[0] * shape[1])
    return counts[: shape[0] * shape[1]].view(shape)


class ExitGPT(nn.Module):
    """:class:`GPT` plus exit heads and ``len(lambdas)`` gate sets (none: the plain GPT)."""

    def __init__(self, cfg: GPTConfig, lambdas: tuple[float, ...] = (), gate_hidden: int = 16):
        super().__init__()
        self.gpt = GPT(cfg)
        self.cfg = cfg
        self.lambdas = tuple(float(x) for x in lambdas)
        L = cfg.n_layer
        self.exit_norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(L - 1))
        self.gates = nn.ModuleList(
            nn.ModuleList(Gate(NUM_FEATURES, gate_hidden) for _ in range(L - 1))
            for _ in self.lambdas
        )

    @property
    def moe_layers(self) -> list[MoE]:
        return self.gpt.moe_layers

    def exit_logits(self, layer: int, h: Tensor) -> Tensor:
        """``[..., V]`` prediction of exit ``layer`` (0-based) from its hidden state."""
        if layer == self.cfg.n_layer - 1:
            return self.gpt.head(self.gpt.ln_f(h))
        return self.gpt.head(self.exit_norms[layer](h))

    def gate_logit(self, member: int, layer: int, logits: Tensor, prev: Tensor | None) -> Tensor:
        pos = layer / max(self.cfg.n_layer - 1, 1)
        return self.gates[member][layer](gate_features_at(logits, prev, pos))

    def _embed(self, idx: Tensor, past: int) -> Tensor:
        if self.cfg.block_size < past + idx.shape[1]:
            raise ValueError(
                f"sequence length {past + idx.shape[1]} exceeds model.block_size="
                f"{self.cfg.block_size}"
            )
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        return self.gpt.drop(self.gpt.tok_emb(idx) + self.gpt.pos_emb(pos))

    def forward_all(self, idx: Tensor) -> tuple[Tensor, list]:
        """Training pass: every block on every token. ``[B, T, L, V]`` logits of every exit and
        the routings (one per MoE block)."""
        x = self._embed(idx, 0)
        logits, routings = [], []
        for i, block in enumerate(self.gpt.blocks):
            x, routing = block(x, idx)
            if routing is not None:
                routings.append(routing)
            logits.append(self.exit_logits(i, x))
        return torch.stack(logits, dim=2), routings

    def block_costs(self, routings: list, shape: torch.Size, past: int = 0) -> Tensor:
        """``[B, T, L]`` FLOPs of running each block in full on each token."""
        c, d = self.cfg, self.cfg.d_model
        context = torch.arange(past + 1, past + shape[1] + 1, device=routings[0].token_idx.device
                               if routings else None).expand(shape)  # fmt: skip
        it = iter(routings)
        cols = []
        for block in self.gpt.blocks:
            experts = experts_per_token(next(it), shape) if isinstance(block.ffn, MoE) else None
            cols.append(attention_flops(d, context) + ffn_flops(block.ffn, d, c.d_ff, experts))
        return torch.stack(cols, dim=-1)

    def kv_flops(self) -> float:
        """K/V projections of one block for an exited token: ``2 * 2 d^2``."""
        return 4.0 * self.cfg.d_model**2

    def full_cost(self, T: int) -> float:
        """Reference FLOPs per token: the dense GPT of this shape at the mean context (T+1)/2."""
        d = self.cfg.d_model
        per_block = 8 * d * d + 4 * (T + 1) / 2 * d + 4 * d * self.cfg.d_ff
        return self.cfg.n_layer * per_block

    @torch.no_grad()
    def exit_forward(
        self,
        idx: Tensor,
        member: int | None = 0,
        cache: KVCache | None = None,
        forced: Tensor | None = None,
        threshold: float = 0.5,
    ) -> ExitForward:
        """Inference with per-token exits (``idx: [B, T]``).

        A token leaves at the first block whose gate of set ``member`` exceeds ``threshold``
        (``member=None``: no exits). ``forced: [B, T]`` imposes the exit blocks instead. With
        ``cache`` the tokens continue the cached ones; exited tokens still write their
        (propagated) keys and values into it.
        """
        B, T = idx.shape
        L = self.cfg.n_layer
        past = 0 if cache is None else cache.length
        x = self._embed(idx, past)
        active = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        exits = torch.full((B, T), L - 1, dtype=torch.long, device=idx.device)
        out = None
        flops = torch.zeros(B, T, dtype=torch.float64, device=idx.device)
        context = torch.arange(past + 1, past + T + 1, device=idx.device).expand(B, T)
        prev = None
        for i, block in enumerate(self.gpt.blocks):
            y, routing = block(x, idx, cache, i)
            experts = experts_per_token(routing, (B, T)) if routing is not None else None
            full = attention_flops(self.cfg.d_model, context)
            full = full + ffn_flops(block.ffn, self.cfg.d_model, self.cfg.d_ff, experts)
            flops += torch.where(active, full, torch.full_like(full, self.kv_flops()))
            x = torch.where(active[..., None], y, x)  # exited tokens keep their exit state
            z = self.exit_logits(i, x)
            out = z if out is None else torch.where(active[..., None], z, out)
            if i == L - 1:
                break
            if forced is not None:
                leave = active & (forced == i)
            elif member is None:
                leave = torch.zeros_like(active)
            else:
                leave = active & (torch.sigmoid(self.gate_logit(member, i, z, prev)) > threshold)
            exits[leave] = i
            active = active & ~leave
            prev = z
        if cache is not None:
            cache.advance(T)
        return ExitForward(out, exits, flops)

    @torch.no_grad()
    def generate_greedy(
        self, idx: Tensor, max_new_tokens: int, member: int | None = 0
    ) -> tuple[Tensor, Tensor]:
        """Greedy decoding with exits and a KV cache (up to ``block_size`` tokens in all).
        Returns the tokens ``[B, T + n]`` and the exit block of every input position
        ``[B, T + n - 1]`` (the prompt's, then each generated token's)."""
        if idx.shape[1] + max_new_tokens > self.cfg.block_size:
            raise ValueError(
                f"prompt + max_new_tokens = {idx.shape[1] + max_new_tokens} exceeds "
                f"model.block_size={self.cfg.block_size}"
            )
        cache = self.gpt.new_cache(idx.shape[0])
        step = self.exit_forward(idx, member, cache)
        exits = [step.exits]
        tokens = idx
        for n in range(max_new_tokens):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if n == max_new_tokens - 1:
                break
            step = self.exit_forward(nxt, member, cache)
            exits.append(step.exits)
        return tokens, torch.cat(exits, dim=1)


def exit_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B*T, L]`` per-token, per-exit cross-entropy from ``logits: [B, T, L, V]``."""
    B, T, L, V = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(-1, V), targets[:, :, None].expand(B, T, L).reshape(-1),
        reduction="none",
    )  # fmt: skip
    return ce.view(B * T, L)
