"""The GPT's configuration: sizes, where the MoE blocks go, and the block internals (``arch``).

:class:`GPTConfig` is a plain typed dataclass (the ``model`` section of a run config);
:meth:`GPTConfig.validate` refuses bad values by name. The model is :mod:`xmoe.models.gpt`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .._checks import check_bool, check_choice, check_int, check_positive
from ..moe.config import MoEConfig

ARCHS = ("gpt", "qwen3_moe")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 128  # context length
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # width of the dense FFN (and the reference for moe_compute_ratio)
    moe_every: int = 1  # 1: every block is MoE; 2: every second block; 0: no MoE (dense)
    dropout: float = 0.0
    activation: str = "gelu"  # dense FFN activation ("swiglu" for arch qwen3_moe)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # gpt: GPT-2 blocks; qwen3_moe: Hugging Face's Qwen3-MoE blocks (RMSNorm, rotary, q/k norm)
    arch: str = "gpt"
    tie_embeddings: bool = True  # output head shares the token embedding (fewer parameters)
    rope_theta: float = 10000.0  # qwen3_moe: rotary base (RoFormer's default)
    norm_eps: float = 1e-6  # qwen3_moe: RMSNorm epsilon (Qwen3's rms_norm_eps)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            check_int(f"model.{name}", getattr(self, name), 1)
        check_int("model.moe_every", self.moe_every, 0)
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        check_choice("model.arch", self.arch, ARCHS)
        check_bool("model.tie_embeddings", self.tie_embeddings)
        if self.arch == "qwen3_moe":
            self._validate_qwen3_moe()

    def _validate_qwen3_moe(self) -> None:
        check_positive("model.rope_theta", self.rope_theta)
        check_positive("model.norm_eps", self.norm_eps)
        head_dim = self.d_model // self.n_head
        if head_dim % 2:
            raise ValueError(
                f"model.arch=qwen3_moe needs an even head width d_model / n_head for rotary "
                f"positions, got {self.d_model} / {self.n_head} = {head_dim}"
            )
        layers = range(self.n_layer)
        if any(not self.is_moe_layer(i) for i in layers) and self.activation != "swiglu":
            raise ValueError(
                "model.arch=qwen3_moe: dense blocks are SwiGLU, set model.activation=swiglu "
                f"(got {self.activation!r})"
            )
        has_moe = any(self.is_moe_layer(i) for i in layers)
        if has_moe and (self.moe.activation != "swiglu" or self.moe.bias):
            raise ValueError(
                "model.arch=qwen3_moe: experts are SwiGLU without bias, set "
                "model.moe.activation=swiglu and model.moe.bias=false (got "
                f"activation={self.moe.activation!r}, bias={self.moe.bias!r})"
            )

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)
