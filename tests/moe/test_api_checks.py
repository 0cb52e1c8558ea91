"""Issue 17 item 6: the library API refuses what its kernels cannot take, with a clear error."""

from __future__ import annotations

import pytest
import torch

import xmoe.moe.kernels.grouped as grouped
from xmoe import MoE
from xmoe.moe.kernels.segment_ffn import segment_ffn
from xmoe.routing import make_router
from xmoe.routing.local_search import PermutationLocalSearch


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
)
@pytest.mark.parametrize("backend", ["loop", "segment", "grouped_mm"])
def test_non_float_input_is_a_type_error_naming_the_dtype(dtype, backend):
    moe = MoE(16, 4, 8, router="topk", k=2, backend=backend)
    x = torch.ones(5, 16).to(dtype)
    with pytest.raises(TypeError, match=f"x must be a floating-point tensor .*got dtype {dtype}"):
        moe(x)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        moe([[0.0] * 16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_float_inputs_still_run(dtype):
    moe = MoE(16, 4, 8, router="topk", k=2, backend="loop")
    assert moe(torch.randn(5, 16).to(dtype)).dtype == dtype


def test_unknown_keyword_arguments_to_forward_are_refused():
    moe = MoE(16, 4, 8, router="topk", k=2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['tokens_ids'\]"):
        moe(torch.randn(3, 16), tokens_ids=torch.arange(3))
    moe(torch.randn(3, 16), token_ids=torch.arange(3))  # passed to every router (GPT does)
    hashed = MoE(16, 4, 8, router="hash", vocab_size=10)
    hashed(torch.randn(3, 16), token_ids=torch.arange(3))


def test_a_router_instance_of_another_width_is_refused_at_construction():
    with pytest.raises(
        ValueError, match="router reads rows of d_model=32 but the MoE has d_model=16"
    ):
        MoE(16, 4, 8, router=make_router("topk", 32, 4))
    wrapped = PermutationLocalSearch(make_router("topk", 32, 4))
    with pytest.raises(ValueError, match="d_model=32"):
        MoE(16, 4, 8, router=wrapped)
    MoE(16, 4, 8, router=make_router("topk", 16, 4))  # the right width is accepted


def test_rows_past_int32_offsets_are_refused_by_grouped_offsets(monkeypatch):
    counts = torch.tensor([3, 0, 4])
    assert grouped.grouped_offsets(counts, 7).tolist() == [3, 3, 7]
    assert grouped.grouped_offsets(counts, 7).dtype == torch.int32
    with pytest.raises(ValueError, match=r"2147483648 kept rows do not fit .*int32"):
        grouped.grouped_offsets(counts, 2**31)
    assert grouped.fits_grouped_offsets(2**31 - 1) and not grouped.fits_grouped_offsets(2**31)
    # the grouped_mm backend goes through the same check
    moe = MoE(16, 4, 8, router="topk", k=2, backend="grouped_mm")
    monkeypatch.setattr(grouped, "MAX_GROUPED_ROWS", 5)
    with pytest.raises(ValueError, match="do not fit torch._grouped_mm's int32 segment offsets"):
        moe(torch.randn(10, 16))


def test_the_segment_kernel_takes_the_int64_path_past_int32_rows(monkeypatch):
    torch.manual_seed(0)
    E, d, h, A = 3, 16, 8, 12
    x = torch.randn(A, d, requires_grad=True)
    counts = torch.tensor([5, 0, 7])
    expert_idx = torch.repeat_interleave(torch.arange(E), counts)
    w1, w2 = torch.randn(E, d, h, requires_grad=True), torch.randn(E, h, d, requires_grad=True)
    args = (x, counts, expert_idx, w1, w2, None, None, None, None, "gelu")
    ref = segment_ffn(*args)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w1, w2))
    monkeypatch.setattr(grouped, "MAX_GROUPED_ROWS", A - 1)  # as if A were > 2**31 - 1
    out = segment_ffn(*args)
    grads = torch.autograd.grad(out.square().sum(), (x, w1, w2))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # the loop oracle: rows of expert e through expert e's FFN
    oracle = torch.cat(
        [
            torch.nn.functional.gelu(x[s : s + n] @ w1[e]) @ w2[e]
            for e, (s, n) in enumerate(zip([0, 5, 5], counts.tolist()))
            if n
        ]
    )
    torch.testing.assert_close(out, oracle)
