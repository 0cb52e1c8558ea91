"""The encoder–decoder's blocks: bidirectional attention with a padding mask (encoder self-
attention, and cross-attention whose keys/values are computed once per source), the dense-or-MoE
FFN that routes only real tokens, and the pre-LN encoder and decoder blocks. The decoder's
causal self-attention and the dense FFN are the GPT's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe.layer import MoE
from ..routing import Routing
from .gpt import CausalSelfAttention, DenseFFN, build_moe
from .kv_cache import KVCache
from .seq2seq_config import Seq2SeqConfig


def is_moe(every: int, i: int) -> bool:
    return every > 0 and (i + 1) % every == 0


class Attention(nn.Module):
    """Bidirectional multi-head attention of queries ``x`` over keys/values of ``kv``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def keys_values(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """``kv: [B, S, C]`` → keys, values ``[B, H, S, C/H]`` (computed once per source)."""
        B, S, C = kv.shape
        k, v = self.kv(kv).split(C, dim=2)
        return tuple(t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        """``x: [B, T, C]``; ``key_mask: [B, S]`` True at real (non-pad) keys."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        drop = self.dropout if self.training else 0.0
        mask = key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FFN(nn.Module):
    """The dense FFN or the MoE of a block; MoE routes only the rows where ``mask`` is True."""

    def __init__(self, cfg: Seq2SeqConfig, use_moe: bool) -> None:
        super().__init__()
        gpt = cfg.gpt_view()
        self.inner: nn.Module = (
            build_moe(gpt) if use_moe else DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)
        )

    def forward(self, h: Tensor, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Routing | None]:
        if not isinstance(self.inner, MoE):
            return self.inner(h), None
        if mask is None:
            return self.inner.forward_with_routing(h, token_ids=ids)
        out = torch.zeros_like(h)
        y, routing = self.inner.forward_with_routing(h[mask], token_ids=ids[mask])
        out[mask] = y.to(out.dtype)
        return out, routing


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, use_moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg, use_moe)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Routing | None]:
        h = self.ln1(x)
        k, v = self.attn.keys_values(h)
        x = x + self.drop(self.attn(h, k, v, mask))
        y, routing = self.ffn(self.ln2(x), ids, mask)
        return x + self.drop(y), routing


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, use_moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = CausalSelfAttention(cfg.gpt_view())
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross = Attention(cfg.d_model, cfg.n_head, cfg.dropout)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg, use_moe)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        ids: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        src_mask: Tensor,
        tgt_mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[Tensor, Routing | None]:
        x = x + self.drop(self.self_attn(self.ln1(x), cache, layer))
        x = x + self.drop(self.cross(self.ln2(x), *memory_kv, src_mask))
        y, routing = self.ffn(self.ln3(x), ids, tgt_mask)
        return x + self.drop(y), routing
