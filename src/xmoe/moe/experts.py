"""Stacked expert weights and the grouped compute backends.

Expert ``e`` computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``; GLU activations (``swiglu``)
compute ``silu(x @ w1[e] + b1[e]) * (x @ w3[e] + b3[e]) @ w2[e] + b2[e]``.

Backends (all compute only the rows they are given, i.e. only kept pairs):
- ``segment``: one hand-written autograd node (:mod:`xmoe.moe.kernels.segment_ffn`): per-segment GEMMs
  into preallocated buffers, elementwise work batched over all rows, weight gradients written
  straight into stacked buffers. Any dtype, any shape. The fastest on CPU.
- ``grouped_mm``: ``torch._grouped_mm`` over contiguous segments with int32 offsets, autograd
  through PyTorch's own backward. Needs 16-byte aligned row strides (d_model and d_expert
  multiples of 4 in fp32, 8 in bf16). One kernel per GEMM on CUDA.
- ``loop``: one autograd GEMM per non-empty segment (the plain reference).
- ``auto``: ``grouped_mm`` on CUDA where it works, ``segment`` otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing.base import _check_int
from .kernels.segment_ffn import activate, segment_ffn

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
BACKENDS = ("auto", "segment", "grouped_mm", "loop")


class Experts(nn.Module):
    """E independent FFN experts with stacked weights.

    Args:
        num_experts: E >= 1.
        d_model: input and output width.
        d_expert: hidden width of each expert.
        activation: one of ``"gelu"`` (exact erf), ``"relu"``, ``"silu"``, ``"swiglu"`` (GLU).
        bias: add ``b1 [E, d_expert]`` and ``b2 [E, d_model]`` (and ``b3`` for GLU).
        backend: one of ``"auto"``, ``"segment"``, ``"grouped_mm"``, ``"loop"``.

    Parameters: ``w1 [E, d_model, d_expert]``, ``w2 [E, d_expert, d_model]``, ``w3`` like ``w1``
    for GLU. Every expert is initialised independently (nn.Linear's default bounds).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_expert: int,
        activation: str = "gelu",
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_int("num_experts", num_experts, 1)
        _check_int("d_model", d_model, 1)
        _check_int("d_expert", d_expert, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.backend = backend
        self.glu = activation == "swiglu"
        E = num_experts
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(E, d_expert, d_model))
        self.w3 = nn.Parameter(torch.empty(E, d_model, d_expert)) if self.glu else None
        self.b1 = nn.Parameter(torch.empty(E, d_expert)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, d_model)) if bias else None
        self.b3 = nn.Parameter(torch.empty(E, d_expert)) if bias and self.glu else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Independent uniform init per element, with nn.Linear's fan-in bounds."""
        in_bound, out_bound = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_expert)
        for p in (self.w1, self.w3, self.b1, self.b3):
            if p is not None:
                nn.init.uniform_(p, -in_bound, in_bound)
        for p in (self.w2, self.b2):
            if p is not None:
                nn.init.uniform_(p, -out_bound, out_bound)

    @property
    def flops_per_row(self) -> int:
        """Multiply-add FLOPs (x2) of one token through one expert, biases excluded."""
        return 2 * self.d_model * self.d_expert * (3 if self.glu else 2)

    def resolve_backend(self, dtype: torch.dtype, device: torch.device | None = None) -> str:
        """The backend ``auto`` picks: ``grouped_mm`` on CUDA when supported, else ``segment``."""
        if self.backend != "auto":
            return self.backend
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and grouped_mm_supported(dtype, self.d_model, self.d_expert):
            return "grouped_mm"
        return "segment"

    def forward(
        self, x: Tensor, counts: Tensor, expert_idx: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """Run each expert on its segment.

        Args:
            x: ``[A, d_model]`` rows sorted by expert.
            counts: ``[E]`` int64 rows per expert (segments are contiguous, in expert order).
            expert_idx: ``[A]`` int64 expert of each row (used for the biases).
            weight: optional ``[A]`` combine weight per row; the output rows are scaled by it
                (the ``segment`` backend folds it into the hidden rows, which is cheaper).
        Returns:
            ``[A, d_model]`` expert outputs, in the compute dtype (autocast's, if enabled), or
            fp32 when ``weight`` is given and the backend scales after the FFN.
        """
        dtype = compute_dtype(x)
        x = x.to(dtype)
        backend = self.resolve_backend(dtype, x.device)
        if backend == "segment":
            return segment_ffn(
                x,
                counts,
                expert_idx,
                self.w1,
                self.w2,
                self.w3,
                self.b1,
                self.b2,
                self.b3,
                self.activation,
                weight,
            )
        y = self._unweighted(x, counts, expert_idx, dtype, backend)
        return y if weight is None else y.to(weight.dtype) * weight.unsqueeze(-1)

    def _unweighted(
        self, x: Tensor, counts: Tensor, expert_idx: Tensor, dtype: torch.dtype, backend: str
    ) -> Tensor:
        if backend == "grouped_mm":
            if not grouped_mm_supported(dtype, self.d_model, self.d_expert):
                raise ValueError(
                    f"backend='grouped_mm' needs {dtype} with d_model and d_expert giving 16-byte "
                    f"aligned rows; got d_model={self.d_model}, d_expert={self.d_expert}. "
                    "Use backend='loop' or 'auto'."
                )
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            mm = lambda a, name: _contiguous_grad(
                torch._grouped_mm(a, getattr(self, name).to(dtype), offs=offsets)
            )
            return self._ffn(x, expert_idx, mm)
        return self._loop(x, counts, expert_idx, dtype)

    def _ffn(self, x: Tensor, expert_idx: Tensor, mm) -> Tensor:
        """The expert FFN; ``mm(a, name)`` multiplies rows ``a`` by weight ``name`` ("w1"...)."""
        dtype = x.dtype
        h = mm(x, "w1")
        if self.b1 is not None:
            h = h + self.b1.to(dtype).index_select(0, expert_idx)
        if self.glu:
            g = mm(x, "w3")
            if self.b3 is not None:
                g = g + self.b3.to(dtype).index_select(0, expert_idx)
            h = F.silu(h) * g
        else:
            h = activate(h, self.activation)
        y = mm(h, "w2")
        if self.b2 is not None:
            y = y + self.b2.to(dtype).index_select(0, expert_idx)
        return y

    def _loop(self, x: Tensor, counts: Tensor, expert_idx: Tensor, dtype: torch.dtype) -> Tensor:
        sizes = counts.tolist()  # the one host sync: Python needs the segment sizes
        segments = x.split(sizes)
        # unbind once: indexing w[e] per expert would build a full [E, ...] gradient each time.
        names = ("w1", "w2", "w3") if self.glu else ("w1", "w2")
        per_expert = {name: getattr(self, name).to(dtype).unbind(0) for name in names}
        outs = []
        for e, (seg, idx) in enumerate(zip(segments, expert_idx.split(sizes))):
            if sizes[e] == 0:
                continue
            mm = lambda a, name, e=e: a @ per_expert[name][e]
            outs.append(self._ffn(seg, idx, mm))
        if not outs:
            return x.new_zeros(0, self.d_model)
        return torch.cat(outs, 0)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, backend={self.backend!r}"
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_mm_supported(dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    """Whether ``torch._grouped_mm`` accepts these shapes: fp32/bf16, 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    per_16_bytes = 128 // torch.finfo(dtype).bits
    return d_model % per_16_bytes == 0 and d_expert % per_16_bytes == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _contiguous_grad(x: Tensor) -> Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x
