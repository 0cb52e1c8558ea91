"""The ``native`` kernel against a per-expert loop oracle (outputs and every gradient)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from xmoe.moe.kernels import native_ffn as nf
from xmoe.moe.kernels.segment_ffn import segment_ffn

ACTS = ["gelu", "relu", "silu", "swiglu"]
needs_native = pytest.mark.skipif(
    not nf.native_available(), reason=f"native expert kernel: {nf.native_status()}"
)
# bf16: inputs are bf16, accumulation is fp32, and the kernel rounds to bf16 (relative error
# <= 2^-9 ~ 2e-3) only the GEMM operands it makes (hidden rows, d hidden) and each output. A few
# such roundings give a few 1e-3 of a tensor's scale (measured: <= 6e-3 over these cases; the
# segment kernel, which rounds every intermediate, reaches 0.1 on relu's d x). Bound: 1e-2 of
# the max-abs of each float64 reference tensor, computed from the same bf16 inputs.
BF16_REL = 1e-2


def _problem(activation, bias, sizes, d=13, h=7, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, A = len(sizes), sum(sizes)
    glu = activation == "swiglu"
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype)  # noqa: E731
    t = {
        "x": r(A, d),
        "w1": r(E, d, h, scale=d**-0.5),
        "w2": r(E, h, d, scale=h**-0.5),
        "w3": r(E, d, h, scale=d**-0.5) if glu else None,
        "b1": r(E, h, scale=0.5) if bias else None,
        "b2": r(E, d, scale=0.5) if bias else None,
        "b3": r(E, h, scale=0.5) if bias and glu else None,
        "rw": torch.rand(A, generator=gen).to(dtype),
    }
    counts = torch.tensor(sizes, dtype=torch.int64)
    idx = torch.repeat_interleave(torch.arange(E), counts)
    return t, counts, idx


def _oracle(t, counts, activation, weighted):
    """Per-expert loop in float64: y[seg_e] = rw * FFN_e(x[seg_e])."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xs = t["x"][start : start + n]
        h = xs @ t["w1"][e] + (t["b1"][e] if t["b1"] is not None else 0)
        if activation == "swiglu":
            h = F.silu(h) * (xs @ t["w3"][e] + (t["b3"][e] if t["b3"] is not None else 0))
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)
        y = h @ t["w2"][e] + (t["b2"][e] if t["b2"] is not None else 0)
        out.append(y * t["rw"][start : start + n, None] if weighted else y)
        start += n
    return torch.cat(out)


def _run(fn, t, counts, idx, activation, weighted, gy):
    """Output and gradients of every tensor in ``t`` (dict) under ``fn``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items() if v is not None}
    a = {k: leaves.get(k) for k in t}
    if fn is None:
        y = _oracle(a, counts, activation, weighted)
    else:
        rw = a["rw"] if weighted else None
        y = fn(
            a["x"],
            counts,
            idx,
            a["w1"],
            a["w2"],
            a["w3"],
            a["b1"],
            a["b2"],
            a["b3"],
            activation,
            rw,
        )
    y.backward(gy.to(y.dtype))
    grads = {k: v.grad for k, v in leaves.items() if (k != "rw" or weighted)}
    return y.detach(), grads


def _compare(t, counts, idx, activation, weighted, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(int(counts.sum()), t["x"].shape[1], generator=gen)
    t_dt = {k: None if v is None else v.to(dtype) for k, v in t.items()}
    t64 = {k: None if v is None else v.double() for k, v in t_dt.items()}
    ref = _run(None, t64, counts, idx, activation, weighted, gy.to(dtype).double())
    got = _run(nf.native_ffn, t_dt, counts, idx, activation, weighted, gy)
    return ref, got, t_dt, gy


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


SIZES = {
    "empty_experts_and_cut_tiles": [3, 0, 300, 1, 0, 17],  # 300 > ROW_TILE: chunks mid-segment
    "one_expert_takes_all": [0, 0, 64, 0],
    "single_row": [0, 1, 0],
}


@needs_native
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp32_matches_the_loop_oracle_outputs_and_gradients(activation, bias, weighted):
    t, counts, idx = _problem(activation, bias, SIZES["empty_experts_and_cut_tiles"])
    (y_ref, g_ref), (y, g), _, _ = _compare(t, counts, idx, activation, weighted, torch.float32)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert g[k].dtype == torch.float32 and g[k].shape == g_ref[k].shape, k
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=1e-5, atol=1e-5, msg=k)


@needs_native
@pytest.mark.parametrize("case", sorted(SIZES))
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fp32_edge_cases_match_the_oracle(case, activation):
    t, counts, idx = _problem(activation, True, SIZES[case], d=16, h=9)
    (y_ref, g_ref), (y, g), _, _ = _compare(t, counts, idx, activation, True, torch.float32)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for k in g_ref:
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=1e-5, atol=1e-5, msg=k)


@needs_native
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("case", sorted(SIZES))
def test_bf16_matches_the_oracle_within_bf16_rounding(activation, case):
    # d=40, h=37: more than one 32-column panel, odd K, 12-row micro-tiles cut mid-segment.
    t, counts, idx = _problem(activation, True, SIZES[case], d=40, h=37)
    (y_ref, g_ref), (y, g), t_bf, gy = _compare(t, counts, idx, activation, True, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert _max_rel(y, y_ref) <= BF16_REL
    for k in g_ref:
        assert g[k].dtype == torch.bfloat16, k
        assert _max_rel(g[k], g_ref[k]) <= BF16_REL, (k, _max_rel(g[k], g_ref[k]))


@needs_native
def test_fp32_matches_the_segment_kernel_at_the_bench_shape_slice():
    # float64 is not a native dtype (it delegates to the segment kernel), so the float64
    # gradcheck lives in test_segment_ffn.py; here: the two fp32 kernels agree, all gradients.
    t, counts, idx = _problem("swiglu", True, [40, 0, 130, 7, 64], d=64, h=48)
    gy = torch.randn(int(counts.sum()), 64)
    y_seg, g_seg = _run(segment_ffn, t, counts, idx, "swiglu", True, gy)
    y, g = _run(nf.native_ffn, t, counts, idx, "swiglu", True, gy)
    torch.testing.assert_close(y, y_seg, rtol=1e-5, atol=1e-5)
    for k in g_seg:
        torch.testing.assert_close(g[k], g_seg[k], rtol=1e-5, atol=1e-5, msg=k)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_mode_builds_no_graph_and_matches_training_mode(dtype):
    t, counts, idx = _problem("gelu", True, [5, 0, 30], d=24, h=20, dtype=dtype)
    args = (t["x"], counts, idx, t["w1"], t["w2"], None, t["b1"], t["b2"], None, "gelu", t["rw"])
    w1 = t["w1"].clone().requires_grad_(True)
    y_train = nf.native_ffn(*args[:3], w1, *args[4:])
    assert y_train.grad_fn is not None
    with torch.inference_mode():
        y_inf = nf.native_ffn(*args)
    with torch.no_grad():
        y_ng = nf.native_ffn(*args[:3], w1, *args[4:])
    assert y_inf.grad_fn is None and y_ng.grad_fn is None and y_inf.dtype == dtype
    torch.testing.assert_close(y_inf, y_train.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_ng, y_train.detach(), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_a_weight_update_invalidates_the_prepacked_weights(param_dtype):
    # bf16 inputs use the VNNI-packed cache; fp32 master weights are cast once per version.
    t, counts, idx = _problem("silu", False, [10, 3, 25], d=33, h=20)
    x = t["x"].bfloat16()
    w1 = torch.nn.Parameter(t["w1"].to(param_dtype))
    w2 = torch.nn.Parameter(t["w2"].to(param_dtype))
    opt = torch.optim.SGD([w1, w2], lr=0.5)

    def fwd():
        return nf.native_ffn(x, counts, idx, w1, w2, None, None, None, None, "silu")

    def fresh():
        nf.clear_pack_cache()
        with torch.no_grad():
            return fwd()

    y0 = fwd()
    torch.testing.assert_close(fwd(), y0, rtol=0, atol=0)  # cache hit, same answer
    y0.float().square().sum().backward()
    assert w1.grad.dtype == param_dtype and w2.grad.dtype == param_dtype
    opt.step()  # in-place update: bumps _version
    y1 = fwd()
    assert not torch.equal(y1, y0)
    torch.testing.assert_close(y1, fresh(), rtol=0, atol=0)
    with torch.no_grad():
        w2.mul_(0.0)
    assert fwd().abs().max().item() == 0.0


@needs_native
def test_status_names_the_instruction_path():
    status = nf.native_status()
    assert status.startswith("built")
    assert "fp32" in status and "bf16" in status


def test_xmoe_native_0_disables_it_and_falls_back_to_the_segment_kernel():
    code = (
        "import torch\n"
        "from xmoe.moe.kernels import native_ffn as nf\n"
        "assert not nf.native_available()\n"
        "print(nf.native_status())\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "c = torch.tensor([1, 3]); i = torch.tensor([0, 1, 1, 1])\n"
        "w1 = torch.randn(2, 3, 5); w2 = torch.randn(2, 5, 3)\n"
        "y = nf.native_ffn(x, c, i, w1, w2, None, None, None, None, 'relu')\n"
        "from xmoe.moe.kernels.segment_ffn import segment_ffn\n"
        "z = segment_ffn(x, c, i, w1, w2, None, None, None, None, 'relu')\n"
        "assert torch.equal(y, z); y.sum().backward()\n"
    )
    env = {**os.environ, "XMOE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "disabled (XMOE_NATIVE=0)" in out.stdout
