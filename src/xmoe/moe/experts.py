"""Stacked expert weights and the grouped compute backends.

Expert ``e`` computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``; gated (GLU) activations
(``swiglu``, or ``glu=True``) compute
``act(x @ w1[e] + b1[e]) * (x @ w3[e] + b3[e]) @ w2[e] + b2[e]``.
``act`` is a built-in name or any elementwise callable (:mod:`xmoe.moe.activations`).

Backends (all compute only the rows they are given, i.e. only kept pairs):
- ``native``: the C++ CPU kernel (:mod:`xmoe.moe.kernels.native_ffn`), built at first use: one
  call for all experts, threads over (expert, row-chunk) items, fp32 through BLAS and bf16
  through an AVX-512 BF16 micro-kernel over prepacked weights, forward and backward. Built-in
  activations (gated: SwiGLU only), fp32 / bf16. Where it cannot run (no compiler, another
  dtype or device) it hands the call to ``segment``.
- ``segment``: one hand-written autograd node (:mod:`xmoe.moe.kernels.segment_ffn`): per-segment
  GEMMs into preallocated buffers, elementwise work batched over all rows, weight gradients
  written straight into stacked buffers. Any dtype, any shape, built-in activations only (its
  backward is written by hand). The fastest on CPU.
- ``grouped_mm``: ``torch._grouped_mm`` over contiguous segments with int32 offsets, autograd
  through PyTorch's own backward. Needs 16-byte aligned row strides (d_model and d_expert
  multiples of 4 in fp32, 8 in bf16). One kernel per GEMM on CUDA.
- ``loop``: one autograd GEMM per non-empty segment (the plain reference).
- ``auto``: ``grouped_mm`` on CUDA where it works; on CPU ``native`` where it is built and
  applies, else ``segment``; ``loop`` for a callable activation that is no built-in.
  ``XMOE_NATIVE=0`` in the environment turns the native kernel off.

A callable activation runs through autograd (``grouped_mm``, ``loop``); one that equals a
built-in bit for bit (e.g. Hugging Face's exact ``GELUActivation``) is recognised as that
built-in, so ``segment`` runs it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from .activations import ACTIVATIONS, resolve_activation
from .kernels.grouped import grouped_mm_supported, grouped_offsets
from .kernels.native_ffn import native_available, native_ffn
from .kernels.segment_ffn import segment_ffn

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "Experts",
    "backend_available",
    "compute_dtype",
    "grouped_mm_supported",
]

BACKENDS = ("auto", "native", "segment", "grouped_mm", "loop")


class Experts(nn.Module):
    """E independent FFN experts with stacked weights.

    Args:
        num_experts: E >= 1.
        d_model: input and output width.
        d_expert: hidden width of each expert.
        activation: ``"gelu"`` (exact erf), ``"relu"``, ``"silu"``, ``"swiglu"`` (GLU), or any
            elementwise callable ``[A, h] -> [A, h]``.
        bias: add ``b1 [E, d_expert]`` and ``b2 [E, d_model]`` (and ``b3`` for GLU).
        backend: one of ``"auto"``, ``"segment"``, ``"grouped_mm"``, ``"loop"``.
        glu: gate the activation with a second input projection ``w3`` (``"swiglu"`` always is).
        output_bias: add ``b2``; default: as ``bias``. False when the caller adds the output bias
            once per token (a dense FFN sliced into experts).

    Parameters: ``w1 [E, d_model, d_expert]``, ``w2 [E, d_expert, d_model]``, ``w3`` like ``w1``
    for GLU. Every expert is initialised independently (nn.Linear's default bounds).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_expert: int,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        bias: bool = True,
        backend: str = "auto",
        *,
        glu: bool = False,
        output_bias: bool | None = None,
    ) -> None:
        super().__init__()
        check_int("num_experts", num_experts, 1)
        check_int("d_model", d_model, 1)
        check_int("d_expert", d_expert, 1)
        self.act = resolve_activation(activation, glu)
        check_choice("backend", backend, BACKENDS)
        if backend in ("segment", "native") and self.act.builtin is None:
            raise ValueError(
                f"backend={backend!r} supports only the built-in activations {ACTIVATIONS}; "
                f"the callable {type(activation).__name__} needs backend='loop', 'grouped_mm' or "
                "'auto'"
            )
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.backend = backend
        self.glu = self.act.glu
        E = num_experts
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(E, d_expert, d_model))
        self.w3 = nn.Parameter(torch.empty(E, d_model, d_expert)) if self.glu else None
        self.b1 = nn.Parameter(torch.empty(E, d_expert)) if bias else None
        out_bias = bias if output_bias is None else output_bias
        self.b2 = nn.Parameter(torch.empty(E, d_model)) if out_bias else None
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
        """The backend ``auto`` picks: ``grouped_mm`` on CUDA when supported; on CPU ``native``
        when it is built and takes this activation and dtype, else ``segment`` (``loop`` for a
        callable activation that is no built-in)."""
        if self.backend != "auto":
            return self.backend
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and grouped_mm_supported(dtype, self.d_model, self.d_expert):
            return "grouped_mm"
        if self.act.builtin is None:
            return "loop"
        native = (
            not on_cuda
            and dtype in (torch.float32, torch.bfloat16)
            and self.native_activation is not None
            and native_available()
        )
        return "native" if native else "segment"

    @property
    def native_activation(self) -> str | None:
        """The activation name the native kernel takes for these experts (None: it cannot)."""
        name = self.act.builtin
        if name is None or not self.glu:
            return name
        return "swiglu" if name == "silu" else None

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
        if backend in ("segment", "native"):
            # The hand-written kernels: native where it takes this activation, else segment.
            native = backend == "native" and self.native_activation is not None
            kernel, act = (native_ffn, self.native_activation) if native else (segment_ffn, None)
            w, b = (self.w1, self.w2, self.w3), (self.b1, self.b2, self.b3)
            return kernel(x, counts, expert_idx, *w, *b, act or self.act.builtin, weight)
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
            offsets = grouped_offsets(counts, x.shape[0])  # int32: refuses rows that wrap
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
        h = self.act.fn(h)
        if self.glu:
            g = mm(x, "w3")
            if self.b3 is not None:
                g = g + self.b3.to(dtype).index_select(0, expert_idx)
            h = h * g
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
            f"activation={self.activation!r}, glu={self.glu}, bias={self.b1 is not None}, "
            f"output_bias={self.b2 is not None}, backend={self.backend!r}"
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def backend_available(backend: str, dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    """Whether ``backend`` can run experts of these widths in ``dtype`` on this install."""
    check_choice("backend", backend, BACKENDS)
    if backend == "grouped_mm":
        return grouped_mm_supported(dtype, d_model, d_expert)
    if backend == "native":
        return dtype in (torch.float32, torch.bfloat16) and native_available()
    return True


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
