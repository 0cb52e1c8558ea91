"""A small decoder-only GPT whose FFNs can be MoE layers. Read it top to bottom.

Pre-LN blocks, causal scaled-dot-product attention, learned positions, tied embeddings.
Every ``moe_every``-th block (1-based: blocks moe_every-1, 2*moe_every-1, ...) uses :class:`MoE`
instead of the dense FFN. The model's loss is the LM cross-entropy plus the weighted router losses.

``arch`` picks the block internals:

- ``gpt`` (default): GPT-2 style: LayerNorm, learned positions, biased attention and FFN.
- ``qwen3_moe``: Hugging Face's Qwen3-MoE exactly (:mod:`xmoe.models.layers`): RMSNorm,
  rotary positions, RMSNorm on queries and keys, no biases, SwiGLU dense FFN and experts
  (``activation`` and ``moe.activation`` ``"swiglu"``, ``moe.bias`` false). Such a model exports
  to a checkpoint transformers loads as it is (``xmoe export-hf``, :mod:`xmoe.hf.export`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..moe.activations import activation_module
from ..moe.config import MoEConfig
from ..moe.experts import Experts
from ..moe.layer import MoE
from ..routing import Routing
from .gpt_config import ARCHS, GPTConfig
from .kv_cache import KVCache
from .layers import GatedMLP, RMSNorm, RotaryAttention, causal_attention

# The config lives in gpt_config.py; it is importable from here as before.
__all__ = [
    "ARCHS",
    "GPT",
    "Block",
    "CausalSelfAttention",
    "DenseFFN",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "MoEConfig",
    "build_moe",
    "build_norm",
    "routing_summary",
]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x: [B, T, C]``; with ``cache``, the T tokens follow its ``cache.length`` ones."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        drop = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # PyTorch's CPU flash-attention backward is slower in bf16 than in fp32 (demo GPT,
            # 2 threads: 56 vs 25 ms per step) while the GEMMs around it gain from bf16.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), cache, layer, drop)
        else:
            y = self._attend(q, k, v, cache, layer, drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    _attend = staticmethod(causal_attention)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.act = activation_module(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


def build_moe(cfg: GPTConfig, moe: MoEConfig | None = None) -> MoE:
    """The MoE layer of a block: ``moe`` (default ``cfg.moe``) at the model's width, with the
    model's vocabulary for routers that route by token id."""
    return MoE.from_config(cfg.moe if moe is None else moe, cfg.d_model, vocab_size=cfg.vocab_size)


def build_norm(cfg: GPTConfig) -> nn.Module:
    """The model's norm: LayerNorm (``gpt``) or RMSNorm (``qwen3_moe``)."""
    if cfg.arch == "qwen3_moe":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, use_moe: bool) -> None:
        super().__init__()
        qwen = cfg.arch == "qwen3_moe"
        self.ln1 = build_norm(cfg)
        if qwen:
            self.attn: nn.Module = RotaryAttention(
                cfg.d_model,
                cfg.n_head,
                rope_theta=cfg.rope_theta,
                norm_eps=cfg.norm_eps,
                dropout=cfg.dropout,
            )
        else:
            self.attn = CausalSelfAttention(cfg)
        self.ln2 = build_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        if use_moe:
            self.ffn: nn.Module = build_moe(cfg)
        elif qwen:
            self.ffn = GatedMLP(cfg.d_model, cfg.d_ff)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(
        self, x: Tensor, token_ids: Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[Tensor, Routing | None]:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        h = self.ln2(x)
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn.forward_with_routing(h, token_ids=token_ids)
        else:
            y, routing = self.ffn(h), None
        return x + self.drop(y), routing


@dataclass
class GPTOutput:
    logits: Tensor  # [B, T, vocab]
    loss: Tensor | None  # LM loss + weighted router losses (None without targets)
    lm_loss: Tensor | None  # cross-entropy only
    routings: list[Routing]  # one per MoE block, in depth order


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Learned positions (gpt); qwen3_moe rotates queries and keys in each block instead.
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.arch == "gpt" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layer))
        self.ln_f = build_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2L).

        Routers keep their own init (they are not nn.Linear).
        """
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                for w in (module.w1, module.w3):
                    if w is not None:
                        nn.init.normal_(w, std=0.02)
                nn.init.normal_(module.w2, std=resid_std)
                for b in (module.b1, module.b2, module.b3):
                    if b is not None:
                        nn.init.zeros_(b)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=resid_std)
            if isinstance(block.ffn, (DenseFFN, GatedMLP)):
                nn.init.normal_(block.ffn.proj.weight, std=resid_std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> GPTOutput:
        """``idx: [B, T]`` token ids; ``targets: [B, T]`` or None. With ``cache`` the tokens
        continue the cached ones (positions from ``cache.length``); past + T <= block_size."""
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if self.cfg.block_size < past + T:
            raise ValueError(
                f"sequence length {past + T} exceeds model.block_size={self.cfg.block_size}"
            )
        x = self.embed(idx, past)
        routings: list[Routing] = []
        for i, block in enumerate(self.blocks):
            x, routing = block(x, idx, cache, i)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.advance(T)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return GPTOutput(logits, None, None, routings)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        loss = lm_loss + self.router_loss(routings)
        return GPTOutput(logits, loss, lm_loss, routings)

    def embed(self, idx: Tensor, past: int = 0) -> Tensor:
        """The first block's input for ``idx: [B, T]`` at positions ``past .. past + T - 1``:
        token embeddings (+ learned positions for ``gpt``; ``qwen3_moe`` rotates in attention),
        after dropout. ``[B, T, d_model]``."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(past, past + idx.shape[1], device=idx.device))
        return self.drop(x)

    def loss_coefs(self) -> dict[str, float]:
        """The router's paper defaults, overridden by ``model.moe.loss_coefs``."""
        defaults = self.moe_layers[0].router.default_loss_coefs if self.moe_layers else {}
        return {**defaults, **self.cfg.moe.loss_coefs}

    def router_loss(self, routings: list[Routing]) -> Tensor | float:
        """Sum over MoE layers of ``coef * loss`` for each named router loss, mean over layers."""
        total: Tensor | float = 0.0
        coefs = self.loss_coefs()
        for r in routings:
            for name, value in r.losses.items():
                coef = coefs.get(name, 0.0)
                if coef:
                    total = total + coef * value / len(routings)
        return total

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``block_size`` tokens."""
        c = self.cfg
        dtype = dtype or self.tok_emb.weight.dtype
        device = self.tok_emb.weight.device
        head_dim = c.d_model // c.n_head
        return KVCache.empty(c.n_layer, batch, c.n_head, c.block_size, head_dim, dtype, device)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx: [B, T]``.

        With ``use_cache`` (the default) each step runs the model on the one new token and
        reads the earlier ones' keys and values from a :class:`KVCache`. Positions (learned or
        rotary) end at ``block_size``: when the cache is full, the last ``block_size // 2``
        tokens are encoded again into a fresh cache (so the context slides by half a window at
        a time, and never drops below half a window). Up to ``block_size`` tokens the logits equal
        those of ``use_cache=False``, which recomputes the last ``block_size`` tokens per step.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_int("max_new_tokens", max_new_tokens, 0)
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be [B, T] with T >= 1, got {tuple(idx.shape)}")
        window = self.cfg.block_size
        cache = self.new_cache(idx.shape[0]) if use_cache else None
        step_input = idx[:, -window:]
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(idx[:, -window:]).logits[:, -1, :]
            else:
                if cache.length + step_input.shape[1] > window:
                    cache, step_input = self.new_cache(idx.shape[0]), idx[:, -(window // 2) :]
                logits = self(step_input, cache=cache).logits[:, -1, :]
            logits = logits.float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(logits.softmax(-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
        return idx

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those active per token (experts scaled by experts/token later)."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for m in self.moe_layers for p in m.experts.parameters())
        return {"total": total, "expert": expert, "non_expert": total - expert}


def routing_summary(
    cfg: GPTConfig,
    moe_layers: list[MoE],
    experts_per_token: list[float],
    dropped_fraction: list[float],
) -> dict:
    """Per-layer experts/token and dropped fraction, plus the MoE compute ratio.

    ``moe_compute_ratio`` = expert FLOPs actually computed per token / FLOPs per token of the
    dense FFN of width ``d_ff`` that the MoE replaces (mean over MoE layers; router excluded).
    """
    ratios = [m.compute_ratio(e, cfg.d_ff) for m, e in zip(moe_layers, experts_per_token)]
    return {
        "experts_per_token": list(experts_per_token),
        "moe_compute_ratio": sum(ratios) / len(ratios) if ratios else None,
        "dropped_fraction": list(dropped_fraction),
    }
