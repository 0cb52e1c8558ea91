"""A pre-LN encoder–decoder Transformer whose encoder FFNs can be MoE layers (XMoE's MT setup).

Read it top to bottom; the config is in :mod:`.seq2seq_config`, the blocks (bidirectional
attention with a padding mask, the dense-or-MoE FFN, the encoder and decoder blocks) in
:mod:`.seq2seq_blocks`. The decoder's causal self-attention (with its
:class:`~xmoe.models.kv_cache.KVCache`), the dense FFN and the MoE builder are the GPT's.

Every ``encoder_moe_every``-th encoder block (1-based, as in the GPT; 2 = every second one, as
in the paper) uses :class:`~xmoe.moe.layer.MoE`; ``decoder_moe_every`` does the same in the
decoder (0: dense). Only real (non-pad) tokens are routed. Sources and targets share one
vocabulary and one embedding, tied to the output head. The loss is label-smoothed
cross-entropy over non-pad target tokens plus the weighted router losses.

Incremental decoding (:meth:`Seq2Seq.start` then :meth:`Seq2Seq.step`) feeds one target token
per call: self-attention reads the earlier tokens from the KV cache and cross-attention reads
the source keys/values computed in ``start``, so each step costs O(step) attention and O(1)
everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe.experts import Experts
from ..moe.layer import MoE
from ..routing import Routing
from .gpt import DenseFFN
from .kv_cache import KVCache
from .seq2seq_blocks import DecoderBlock, EncoderBlock, is_moe
from .seq2seq_config import Seq2SeqConfig

__all__ = ["DecodeState", "Seq2Seq", "Seq2SeqConfig", "Seq2SeqOutput"]


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, T, vocab]
    loss: Tensor | None  # smoothed CE + weighted router losses
    nll: Tensor | None  # plain cross-entropy per non-pad target token (no smoothing)
    routings: list[Routing]  # encoder MoE layers first, then decoder ones, in depth order


@dataclass
class DecodeState:
    """What incremental decoding carries between steps, for ``B`` rows (sources × beams)."""

    memory_kv: list[tuple[Tensor, Tensor]]  # per decoder layer: cross-attention keys, values
    src_mask: Tensor  # [B, S]
    cache: KVCache  # decoder self-attention keys/values

    def select(self, rows: Tensor) -> DecodeState:
        """The state of rows ``rows`` (beam reordering): every tensor indexed on dim 0."""
        c = self.cache
        cache = KVCache([k[rows] for k in c.keys], [v[rows] for v in c.values], c.length)
        kv = [(k[rows], v[rows]) for k, v in self.memory_kv]
        return DecodeState(kv, self.src_mask[rows], cache)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.src_pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.tgt_pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(cfg, is_moe(cfg.encoder_moe_every, i)) for i in range(cfg.n_encoder_layers)
        )
        self.ln_enc = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(
            DecoderBlock(cfg, is_moe(cfg.decoder_moe_every, i)) for i in range(cfg.n_decoder_layers)
        )
        self.ln_dec = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied, shared vocabulary
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L) (as the
        GPT); routers keep their own init."""
        depth = self.cfg.n_encoder_layers + self.cfg.n_decoder_layers
        resid_std = 0.02 / math.sqrt(2 * depth)
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
            elif isinstance(module, DenseFFN):
                nn.init.normal_(module.proj.weight, std=resid_std)
        for block in self.encoder:
            nn.init.normal_(block.attn.proj.weight, std=resid_std)
        for block in self.decoder:
            nn.init.normal_(block.self_attn.proj.weight, std=resid_std)
            nn.init.normal_(block.cross.proj.weight, std=resid_std)

    @property
    def encoder_moe_layers(self) -> list[MoE]:
        return [b.ffn.inner for b in self.encoder if isinstance(b.ffn.inner, MoE)]

    @property
    def moe_layers(self) -> list[MoE]:
        """Encoder MoE layers, then decoder ones (the order of ``routings``)."""
        dec = [b.ffn.inner for b in self.decoder if isinstance(b.ffn.inner, MoE)]
        return self.encoder_moe_layers + dec

    def _check_len(self, name: str, length: int) -> None:
        if length > self.cfg.max_len:
            raise ValueError(
                f"{name} length {length} exceeds max_len={self.cfg.max_len} "
                "(truncate the input, or train with a larger max_len)"
            )

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor, list[Routing]]:
        """``src: [B, S]`` (pad-padded) → memory ``[B, S, C]``, mask ``[B, S]``, routings."""
        if src.dim() != 2 or src.shape[1] < 1:
            raise ValueError(f"src must be [B, S] with S >= 1, got {tuple(src.shape)}")
        self._check_len("source", src.shape[1])
        mask = src != self.cfg.pad_id
        pos = torch.arange(src.shape[1], device=src.device)
        x = self.drop(self.tok_emb(src) + self.src_pos(pos))
        routings = []
        for block in self.encoder:
            x, routing = block(x, src, mask)
            if routing is not None:
                routings.append(routing)
        return self.ln_enc(x), mask, routings

    def _memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [block.cross.keys_values(memory) for block in self.decoder]

    def _decode(
        self,
        tgt_in: Tensor,
        state: DecodeState | tuple[list, Tensor],
        tgt_mask: Tensor | None,
    ) -> tuple[Tensor, list[Routing]]:
        if isinstance(state, DecodeState):
            memory_kv, src_mask, cache = state.memory_kv, state.src_mask, state.cache
        else:
            (memory_kv, src_mask), cache = state, None
        past = 0 if cache is None else cache.length
        self._check_len("target", past + tgt_in.shape[1])
        pos = torch.arange(past, past + tgt_in.shape[1], device=tgt_in.device)
        x = self.drop(self.tok_emb(tgt_in) + self.tgt_pos(pos))
        routings = []
        for i, block in enumerate(self.decoder):
            x, routing = block(x, tgt_in, memory_kv[i], src_mask, tgt_mask, cache, i)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.advance(tgt_in.shape[1])
        return self.head(self.ln_dec(x)), routings

    def forward(
        self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor | None = None, smoothing: float = 0.0
    ) -> Seq2SeqOutput:
        """Teacher forcing. ``src: [B, S]``; ``tgt_in: [B, T]`` (BOS + target);
        ``tgt_out: [B, T]`` (target + EOS, pad elsewhere) or None."""
        memory, src_mask, routings = self.encode(src)
        tgt_mask = tgt_in != self.cfg.pad_id
        logits, dec_routings = self._decode(tgt_in, (self._memory_kv(memory), src_mask), tgt_mask)
        routings = routings + dec_routings
        if tgt_out is None:
            return Seq2SeqOutput(logits, None, None, routings)
        flat = logits.float().view(-1, logits.size(-1))
        target = tgt_out.reshape(-1)
        pad = self.cfg.pad_id
        nll = F.cross_entropy(flat, target, ignore_index=pad)
        smoothed = F.cross_entropy(flat, target, ignore_index=pad, label_smoothing=smoothing)
        loss = smoothed + self.router_loss(routings)
        return Seq2SeqOutput(logits, loss, nll, routings)

    def router_loss(self, routings: list[Routing]) -> Tensor | float:
        """Mean over MoE layers of Σ coef·loss (router defaults ← ``moe.loss_coefs``)."""
        layers = self.moe_layers
        if not layers:
            return 0.0
        coefs = {**layers[0].router.default_loss_coefs, **self.cfg.moe.loss_coefs}
        total: Tensor | float = 0.0
        for r in routings:
            for name, value in r.losses.items():
                if coefs.get(name, 0.0):
                    total = total + coefs[name] * value / len(routings)
        return total

    # incremental decoding -------------------------------------------------------------------

    def start(self, src: Tensor) -> DecodeState:
        """Encode ``src: [B, S]`` and make an empty decoder cache for ``max_len`` tokens."""
        memory, src_mask, _ = self.encode(src)
        c = self.cfg
        cache = KVCache.empty(
            c.n_decoder_layers,
            src.shape[0],
            c.n_head,
            c.max_len,
            c.d_model // c.n_head,
            memory.dtype,
            memory.device,
        )
        return DecodeState(self._memory_kv(memory), src_mask, cache)

    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """Feed ``tokens: [B]`` (the next target token of every row); returns the log-probs of
        the token after it, ``[B, vocab]`` (fp32). The state's cache grows by one."""
        logits, _ = self._decode(tokens[:, None], state, None)
        return logits[:, -1].float().log_softmax(-1)

    def num_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for m in self.moe_layers for p in m.experts.parameters())
        return {"total": total, "expert": expert, "non_expert": total - expert}
