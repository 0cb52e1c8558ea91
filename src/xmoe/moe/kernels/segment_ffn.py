"""The ``segment`` expert backend: one autograd node for all experts' FFNs over ragged segments.

Forward and backward are written by hand so that per kept pair the work is exactly the GEMMs the
FFN needs and nothing else:

- GEMMs run per non-empty segment straight into slices of preallocated ``[A, ·]`` buffers
  (``torch.mm(..., out=)``), so there is no ``torch.cat`` and no per-expert autograd graph.
- Elementwise work (bias, activation and their backward) runs once over all ``A`` rows.
- Weight gradients are written into one ``[E, ·, ·]`` buffer per parameter; the plain autograd
  loop instead builds (or accumulates) a full stacked gradient per expert.
- Saved for backward: the input rows and the pre-activations (``[A, h]``, twice for GLU); the
  activation output is recomputed rather than stored.
- Optional per-row combine weights are folded into the hidden rows before the second GEMM
  (ScatterMoE's trick): ``w * (h @ w2 + b2) = (w * h) @ w2 + w * b2``, which scales ``[A, h]``
  instead of ``[A, d]``, and their gradient ``<gy @ w2^T, h> (+ <gy, b2>)`` reuses the
  ``gy @ w2^T`` product the backward needs anyway.
- No host sync when every GEMM can go through ``torch._grouped_mm`` (fp32/bf16, 16-byte aligned
  widths): the segment offsets stay on the device. Otherwise one, for the fallback's sizes.

Empty experts cost nothing in the forward and get an exact zero gradient. On CPU this beat both
``torch._grouped_mm`` and the autograd loop in the benchmarks (see BENCHMARKS.md); on CUDA
``grouped_mm`` stays the default because one kernel beats E launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..activations import GATED, activation_backward, activation_fn
from . import grouped
from .grouped import grouped_mm_supported


def segment_ffn(
    x: Tensor,
    counts: Tensor,
    expert_idx: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    b1: Tensor | None,
    b2: Tensor | None,
    b3: Tensor | None,
    activation: str,
    row_weight: Tensor | None = None,
) -> Tensor:
    """Apply expert ``e``'s FFN to its segment of ``x`` (times ``row_weight``, if given).

    Args:
        x: ``[A, d]`` rows sorted by expert, already in the compute dtype.
        counts: ``[E]`` int64 segment lengths (sum ``A``), on ``x``'s device. Read on the host
            (one sync) only when the shapes need the per-segment ``torch.mm`` fallback.
        expert_idx: ``[A]`` int64 expert of each row (used for the bias gradients).
        w1, w3: ``[E, d, h]``; w2: ``[E, h, d]``. ``w3`` (the gate's up projection) makes the FFN
            gated, ``act(x w1 + b1) * (x w3 + b3)``; None for a plain FFN.
        b1, b3: ``[E, h]`` or None; b2: ``[E, d]`` or None.
        activation: a built-in name (:data:`xmoe.moe.activations.ACTIVATIONS`); ``"swiglu"`` is
            ``"silu"`` (with ``w3``, which it needs).
        row_weight: ``[A]`` combine weight of each row (any float dtype, differentiable), or None.
    Returns:
        ``[A, d]`` in ``x``'s dtype, each row scaled by its ``row_weight``. Parameters
        may be in another dtype; they are cast to ``x``'s
        and their gradients come back in their own dtype.
    """
    return _SegmentFFN.apply(x, counts, expert_idx, activation, row_weight, w1, w2, w3, b1, b2, b3)


def _grouped_ok(*tensors: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (one dtype, aligned row strides).

    Row strides are the last dim, and for a stacked ``[E, m, n]`` weight also ``m`` (it may be
    used transposed); the row count of a 2D operand is free.
    """
    dtype = tensors[0].dtype
    widths = [n for t in tensors for n in (t.shape[-1:] if t.dim() == 2 else t.shape[-2:])]
    return all(t.dtype == dtype for t in tensors) and grouped_mm_supported(dtype, *widths)


class _Segments(NamedTuple):
    """Where each expert's rows are: int32 end ``offsets`` (device) for ``torch._grouped_mm``,
    or, when the shapes need the per-segment fallback (or the rows exceed int32), the Python
    ``sizes``."""

    offsets: Tensor
    sizes: list[int] | None


def _segments(counts: Tensor, *operands: Tensor) -> _Segments:
    rows = operands[0].shape[0]
    if not grouped.fits_grouped_offsets(rows):  # int32 offsets would wrap: the int64 loop path
        return _Segments(torch.cumsum(counts, 0), counts.tolist())
    offsets = grouped.grouped_offsets(counts, rows)
    # The fallback loop needs the sizes in Python: the only host sync of this kernel.
    return _Segments(offsets, None if _grouped_ok(*operands) else counts.tolist())


def _segment_mm(
    a: Tensor,
    w: Tensor,
    segs: _Segments,
    transpose_w: bool = False,
    accumulate: Tensor | None = None,
) -> Tensor:
    """``out[seg_e] = a[seg_e] @ w[e]`` (or ``@ w[e].T``) over the segments.

    One ``torch._grouped_mm`` call when the shapes allow it (measured ~10% faster than the loop
    on CPU, and one kernel on CUDA), else one ``torch.mm`` per non-empty segment into a
    preallocated buffer. With ``accumulate``, adds the products into that tensor in place.
    """
    wt = w.transpose(1, 2) if transpose_w else w
    if segs.sizes is None:
        out = torch._grouped_mm(a, wt, offs=segs.offsets)
        return out if accumulate is None else accumulate.add_(out)
    out = a.new_empty(a.shape[0], wt.shape[2]) if accumulate is None else accumulate
    start = 0
    for e, n in enumerate(segs.sizes):
        if n:
            seg = out[start : start + n]
            if accumulate is None:
                torch.mm(a[start : start + n], wt[e], out=seg)
            else:
                torch.addmm(seg, a[start : start + n], wt[e], out=seg)
            start += n
    return out


def _segment_wgrad(a: Tensor, g: Tensor, segs: _Segments) -> Tensor:
    """``grad[e] = a[seg_e].T @ g[seg_e]`` as one ``[E, a_cols, g_cols]`` tensor (0 if empty)."""
    if segs.sizes is None:
        return torch._grouped_mm(a.t(), g, offs=segs.offsets)
    grad = a.new_empty(len(segs.sizes), a.shape[1], g.shape[1])
    start = 0
    for e, n in enumerate(segs.sizes):
        if n:
            torch.mm(a[start : start + n].t(), g[start : start + n], out=grad[e])
            start += n
        else:
            grad[e].zero_()
    return grad


def _bias_grad(g: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    return g.new_zeros(num_experts, g.shape[1]).index_add_(0, expert_idx, g)


class _SegmentFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, expert_idx, activation, row_weight, w1, w2, w3, b1, b2, b3):
        dtype = x.dtype
        if activation in GATED and w3 is None:
            raise ValueError(f"activation={activation!r} needs the gate weight w3")
        act = activation_fn(activation)
        glu = w3 is not None
        with torch.autocast(x.device.type, enabled=False):
            cast = lambda t: None if t is None else t.to(dtype)
            w1c, w2c, w3c = cast(w1), cast(w2), cast(w3)
            segs = _segments(counts, x, w1c, w2c)
            h1 = _segment_mm(x, w1c, segs)
            if b1 is not None:
                h1 += cast(b1).index_select(0, expert_idx)
            if glu:
                h3 = _segment_mm(x, w3c, segs)
                if b3 is not None:
                    h3 += cast(b3).index_select(0, expert_idx)
                h = act(h1) * h3
            else:
                h3 = None
                h = act(h1)
            rw = None if row_weight is None else row_weight.to(dtype).unsqueeze(1)
            y = _segment_mm(h if rw is None else h * rw, w2c, segs)
            b2c = None if b2 is None else cast(b2)
            if b2 is not None:
                rows = b2c.index_select(0, expert_idx)
                y += rows if rw is None else rows * rw
        ctx.save_for_backward(x, expert_idx, h1, h3, w1c, w2c, w3c, rw, b2c, segs.offsets)
        ctx.sizes, ctx.activation = segs.sizes, activation
        ctx.param_dtypes = [None if t is None else t.dtype for t in (w1, w2, w3, b1, b2, b3)]
        ctx.row_weight_dtype = None if row_weight is None else row_weight.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, expert_idx, h1, h3, w1, w2, w3, rw, b2, offsets = ctx.saved_tensors
        segs, activation = _Segments(offsets, ctx.sizes), ctx.activation
        E = w1.shape[0]
        # inputs: (x, counts, expert_idx, activation, row_weight, w1, w2, w3, b1, b2, b3)
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            gy = gy.to(x.dtype).contiguous()
            glu = w3 is not None
            act = activation_fn(activation)
            s1 = act(h1) if glu else None
            h = s1 * h3 if glu else act(h1)
            grads = [None] * 11
            if need[6]:
                grads[6] = _segment_wgrad(h if rw is None else h * rw, gy, segs)
            if need[9]:
                grads[9] = _bias_grad(gy if rw is None else gy * rw, expert_idx, E)
            gh = _segment_mm(gy, w2, segs, transpose_w=True)  # d loss / d (rw * h)
            if rw is not None:
                if need[4]:
                    g_rw = (gh * h).sum(1)
                    if b2 is not None:
                        g_rw += (gy * b2.index_select(0, expert_idx)).sum(1)
                    grads[4] = g_rw.to(ctx.row_weight_dtype)
                gh *= rw
            del h
            if glu:
                g3 = gh * s1
                g1 = activation_backward(gh * h3, h1, activation)
            else:
                g3 = None
                g1 = activation_backward(gh, h1, activation)
            del gh
            if need[5]:
                grads[5] = _segment_wgrad(x, g1, segs)
            if need[8]:
                grads[8] = _bias_grad(g1, expert_idx, E)
            if glu and need[7]:
                grads[7] = _segment_wgrad(x, g3, segs)
            if glu and need[10]:
                grads[10] = _bias_grad(g3, expert_idx, E)
            if need[0]:
                gx = _segment_mm(g1, w1, segs, transpose_w=True)
                if glu:
                    _segment_mm(g3, w3, segs, transpose_w=True, accumulate=gx)
                grads[0] = gx
        for i, dtype in zip(range(5, 11), ctx.param_dtypes):
            if grads[i] is not None:
                grads[i] = grads[i].to(dtype)
        return tuple(grads)
