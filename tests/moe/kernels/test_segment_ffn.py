"""The ``segment`` kernel against autograd (float64 gradcheck); every backend in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmoe.moe.experts import Experts
from xmoe.moe.kernels.segment_ffn import segment_ffn

ACTS = ["gelu", "relu", "silu", "swiglu"]


def _inputs(activation, bias, sizes, dtype=torch.float64, d=6, h=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, A = len(sizes), sum(sizes)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(True)
    glu = activation == "swiglu"
    x = r(A, d)
    expert_idx = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))
    w1, w2 = r(E, d, h), r(E, h, d)
    w3 = r(E, d, h) if glu else None
    b1, b2 = (r(E, h), r(E, d)) if bias else (None, None)
    b3 = r(E, h) if bias and glu else None
    weight = torch.rand(A, generator=gen, dtype=dtype).requires_grad_(True)
    return x, expert_idx, w1, w2, w3, b1, b2, b3, weight


def _reference(x, expert_idx, w1, w2, w3, b1, b2, b3, weight, activation):
    """Per-row autograd reference: y[a] = weight[a] * FFN_{e(a)}(x[a])."""
    rows = []
    for a in range(x.shape[0]):
        e = int(expert_idx[a])
        h = x[a] @ w1[e] + (b1[e] if b1 is not None else 0)
        if activation == "swiglu":
            h = F.silu(h) * (x[a] @ w3[e] + (b3[e] if b3 is not None else 0))
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)
        y = h @ w2[e] + (b2[e] if b2 is not None else 0)
        rows.append(y if weight is None else weight[a] * y)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_float64_with_an_empty_expert(activation, bias, weighted):
    x, idx, w1, w2, w3, b1, b2, b3, weight = _inputs(activation, bias, [3, 0, 4, 1])
    weight = weight if weighted else None
    sizes = [3, 0, 4, 1]
    tensors = [t for t in (x, w1, w2, w3, b1, b2, b3, weight) if t is not None]

    def fn(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, w1, w2, w3, b1, b2, b3, weight)]
        x_, w1_, w2_, w3_, b1_, b2_, b3_, wt_ = args
        return segment_ffn(
            x_, torch.tensor(sizes), idx, w1_, w2_, w3_, b1_, b2_, b3_, activation, wt_
        )

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)
    out = fn(*tensors)
    torch.testing.assert_close(out, _reference(x, idx, w1, w2, w3, b1, b2, b3, weight, activation))
    out.sum().backward()
    assert torch.equal(w1.grad[1], torch.zeros_like(w1.grad[1]))  # the empty expert
    assert w1.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["segment", "grouped_mm", "loop"])
@pytest.mark.parametrize("activation", ACTS)
def test_bf16_autocast_matches_fp32_within_bf16_tolerance(activation, backend):
    """Every backend under bf16 autocast vs the fp32 loop backend, outputs and grads."""
    torch.manual_seed(0)
    ref = Experts(4, 32, 16, activation, bias=True, backend="loop")
    seg = Experts(4, 32, 16, activation, bias=True, backend=backend)
    seg.load_state_dict(ref.state_dict())
    counts = torch.tensor([10, 0, 7, 15])
    idx = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(int(counts.sum()), 32)
    weight = torch.rand(x.shape[0])
    y_ref = ref(x, counts, idx, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seg(x, counts, idx, weight)
    assert y.dtype == torch.float32 or y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.05)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.float().backward(g)
    for name, p in ref.named_parameters():
        q = dict(seg.named_parameters())[name]
        assert q.grad.dtype == torch.float32, name
        # Relative L2 error: bf16 rounding may flip a few ReLU masks, so no elementwise bound.
        rel = (q.grad - p.grad).norm() / p.grad.norm()
        assert rel < 0.03, (name, rel)


def test_grad_of_unused_inputs_is_not_computed():
    x, idx, w1, w2, w3, b1, b2, b3, weight = _inputs("gelu", False, [2, 2])
    x.requires_grad_(False)
    out = segment_ffn(
        x, torch.tensor([2, 2]), idx, w1, w2.detach(), None, None, None, None, "gelu", None
    )
    out.sum().backward()
    assert x.grad is None and w1.grad is not None


def test_grouped_path_keeps_the_segment_sizes_on_the_device():
    """Aligned fp32/bf16 shapes need no host sync; float64 or odd widths fall back to the loop."""
    import sys

    kernel = sys.modules["xmoe.moe.kernels.segment_ffn"]
    counts = torch.tensor([3, 0, 5])
    aligned = (torch.randn(8, 16), torch.randn(3, 16, 8), torch.randn(3, 8, 16))
    segs = kernel._segments(counts, *aligned)
    assert segs.sizes is None and segs.offsets.tolist() == [3, 3, 8]
    odd = (torch.randn(8, 16), torch.randn(3, 16, 6), torch.randn(3, 6, 16))
    assert kernel._segments(counts, *odd).sizes == [3, 0, 5]
    as64 = tuple(t.double() for t in aligned)
    assert kernel._segments(counts, *as64).sizes == [3, 0, 5]
