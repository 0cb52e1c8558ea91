"""The encoder–decoder's configuration (:class:`Seq2SeqConfig`), and the GPT config view the
shared blocks read."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._checks import check_int, check_range
from ..moe.config import MoEConfig
from .gpt import GPTConfig


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 2000  # shared source/target subword vocabulary
    max_len: int = 64  # tokens per side, BOS/EOS included
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # dense FFN width (the reference of the MoE compute ratio)
    encoder_moe_every: int = 2  # paper: every second encoder layer; 0: dense
    decoder_moe_every: int = 0  # optional MoE in the decoder; 0: dense
    dropout: float = 0.1
    activation: str = "gelu"
    moe: MoEConfig = field(default_factory=MoEConfig)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def validate(self) -> None:
        for name in ("vocab_size", "n_head", "d_model", "d_ff"):
            check_int(name, getattr(self, name), 1)
        check_int("max_len", self.max_len, 2)
        check_int("n_encoder_layers", self.n_encoder_layers, 1)
        check_int("n_decoder_layers", self.n_decoder_layers, 1)
        check_int("encoder_moe_every", self.encoder_moe_every, 0)
        check_int("decoder_moe_every", self.decoder_moe_every, 0)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head")
        for name in ("pad_id", "bos_id", "eos_id"):
            check_int(name, getattr(self, name), 0, self.vocab_size - 1)

    def gpt_view(self) -> GPTConfig:
        """The GPT config the shared blocks read (width, heads, dropout, MoE, vocabulary)."""
        return GPTConfig(
            vocab_size=self.vocab_size,
            block_size=self.max_len,
            n_layer=self.n_decoder_layers,
            n_head=self.n_head,
            d_model=self.d_model,
            d_ff=self.d_ff,
            dropout=self.dropout,
            activation=self.activation,
            moe=self.moe,
        )
