"""Building blocks of the ``qwen3_moe`` GPT architecture, plus the one causal attention core.

The ``qwen3_moe`` blocks compute exactly what Hugging Face's Qwen3-MoE computes (transformers
5: ``Qwen3MoeRMSNorm``, ``Qwen3MoeRotaryEmbedding``, ``apply_rotary_pos_emb``,
``Qwen3MoeAttention`` without grouped keys, ``Qwen3MoeMLP``), so an exported model gives the
same logits under ``transformers.AutoModelForCausalLM``:

- :class:`RMSNorm`: ``w * x / sqrt(mean(x^2) + eps)``, computed in fp32.
- :class:`Rotary`: rotary positions over the whole head, halves rotated (``rotate_half``).
- :class:`RotaryAttention`: no bias, RMSNorm on each head's queries and keys (before the
  rotation), scaled dot-product attention with scale ``head_dim ** -0.5``.
- :class:`GatedMLP`: the dense SwiGLU FFN ``down(silu(gate(x)) * up(x))``, no bias.

:func:`causal_attention` is the attention core both architectures share (with the KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_positive
from .kv_cache import KVCache


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int, drop: float
) -> Tensor:
    """Causal attention of ``q, k, v: [B, H, T, hd]``; with ``cache`` the T new keys/values are
    stored after the ``cache.length`` cached ones and the queries see those too."""
    T = q.shape[2]
    if cache is None or cache.length == 0:
        if cache is not None:
            cache.append(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
    past = cache.length
    k, v = cache.append(layer, k, v)
    # Query i (position past + i) sees keys 0..past + i: all of them when T == 1.
    mask = None
    if T > 1:
        rows = torch.arange(T, device=q.device)[:, None] + past
        mask = torch.arange(past + T, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: ``weight * x / sqrt(mean(x^2) + eps)``.

    Computed in fp32; the normalised ``x`` is cast back to its dtype before the weight
    multiplies it (as Hugging Face's ``Qwen3MoeRMSNorm`` / ``LlamaRMSNorm``). ``x: [..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_positive("eps", eps)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer) in the "rotate half" layout.

    ``inv_freq[i] = theta ** (-2i / head_dim)``; position p rotates the pair
    ``(x[i], x[i + head_dim/2])`` by the angle ``p * inv_freq[i]``. Angles are computed in fp32
    from the integer positions, then cos/sin are cast to the input dtype.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        check_int("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        check_positive("theta", theta)
        self.head_dim = head_dim
        self.theta = float(theta)
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (self.theta**exponent), persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions: [T]`` int → ``cos, sin: [T, head_dim]`` in ``dtype``."""
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: [B, H, T, hd]`` rotated by ``cos, sin: [T, hd]``."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class RotaryAttention(nn.Module):
    """Causal self-attention of the ``qwen3_moe`` architecture.

    ``qkv`` (no bias) projects to queries, keys and values (``[3C, C]``, in that order);
    ``q_norm`` / ``k_norm`` are RMSNorms over each head's ``head_dim``; the rotation follows
    the norms; ``proj`` (no bias) is the output projection. Under CPU bf16 autocast the
    norms, rotation and attention run in fp32 (PyTorch's CPU attention backward is slower in
    bf16, see :class:`~xmoe.models.gpt.CausalSelfAttention`).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("n_head", n_head, 1)
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps)
        self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.rotary = Rotary(self.head_dim, rope_theta)
        self.dropout = dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x: [B, T, C]``; with ``cache``, the T tokens sit at positions
        ``cache.length .. cache.length + T - 1``."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim) for t in self.qkv(x).split(C, dim=2))
        past = 0 if cache is None else cache.length
        positions = torch.arange(past, past + T, device=x.device)
        drop = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), positions, cache, layer, drop)
        else:
            y = self._attend(q, k, v, positions, cache, layer, drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, q, k, v, positions, cache, layer, drop) -> Tensor:
        """``q, k, v: [B, T, H, hd]`` → ``[B, H, T, hd]``."""
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        return causal_attention(q, k, v, cache, layer, drop)


class GatedMLP(nn.Module):
    """The dense SwiGLU FFN: ``proj(silu(fc(x)) * up(x))``, no bias.

    ``fc`` is Hugging Face's ``gate_proj``, ``up`` its ``up_proj``, ``proj`` its ``down_proj``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.silu(self.fc(x)) * self.up(x))
