"""The ``native`` expert backend: one C++ call runs every expert's FFN over its ragged segment.

Same contract as :func:`xmoe.moe.kernels.segment_ffn.segment_ffn`; the difference is where the
time goes. The segment kernel pays a Python and dispatcher round trip per expert and GEMM, and
bf16 weights are re-laid out by oneDNN on every call. Here (``csrc/expert_ffn.cpp``):

- **Work items.** The forward splits each expert's rows into chunks of at most ``ROW_TILE``; the
  backward takes one expert per item, so its weight gradients are written by one thread straight
  into the stacked ``[E, ., .]`` buffers. Threads pull items from a shared counter inside one
  ``at::parallel_for`` (llama.cpp's ``mul_mat_id`` scheme). With fewer experts than that pays
  for, experts run in turn and every GEMM uses all threads.
- **Fusion.** Per item the GEMM results stay in small per-thread fp32 buffers: bias, activation
  and combine weight are applied there, and the hidden rows go into the second GEMM while they
  are still in cache. Backward likewise fuses ``d row_weight``, the activation backward and
  the bias gradients into the GEMM epilogues.
- **fp32 GEMMs** are BLAS (MKL in the PyTorch wheels) through ``at::mm_out`` on views, single
  threaded inside the parallel region: a per-expert 128x512x128 sgemm runs as fast as the dense
  one, so the whole gap was call overhead.
- **bf16 GEMMs** are our own AVX512-BF16 micro-kernel (``vdpbf16ps``, 12x32 fp32 accumulators),
  reading weights **prepacked** once per weight version in VNNI panels (and their transposes
  for the backward), cached here and keyed on tensor identity, ``_version`` and ``data_ptr``.

Why not ``at::native::cpublas::brgemm``: it goes to oneDNN's ukernels only with AMX
(``cpublas::could_pack`` is False on AVX512-BF16 without AMX: "No need to pack"), and its
fallback ran 2x slower than dense here. A micro-kernel of our own works on every AVX512-BF16 CPU
(Zen 4, Cooper Lake, Sapphire Rapids without using its AMX). CPUs without AVX512-BF16 run bf16
inputs through the fp32 path (upcast; correct, fp32 speed). :func:`native_status` says which.

Build: JIT with ``torch.utils.cpp_extension.load`` (ninja) on first use, into
``$XDG_CACHE_HOME/xmoe/native_ffn/<name>``, the name keyed on the torch version, the source hash
and the ISA flags chosen from this CPU's features (so a cache shared between CPUs never loads a
binary built for another ISA). ``XMOE_NATIVE=0`` disables it; a failed build warns once and
:func:`native_available` is False (callers use the ``segment`` kernel).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

_SRC = Path(__file__).with_name("csrc") / "expert_ffn.cpp"
_ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "swiglu": 3}
ROW_TILE_FWD = 128  # rows per forward work item: keeps [rows, h] and [rows, d] fp32 in L2
ROW_TILE_BWD = 128  # rows per backward chunk of an expert

_lock = threading.Lock()
_ext: ModuleType | None = None
_status: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()  # no /proc: trust ATen's own dispatch level
    return {"avx2", "fma"} | (
        {"avx512f", "avx512bw", "avx512vl", "avx512dq"} if cap == "AVX512" else set()
    )


def _isa() -> tuple[str, list[str]]:
    """The ISA level this CPU supports, and the compiler flags for it."""
    f = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"} <= f:
        flags = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if "avx512_bf16" in f:
            return "avx512bf16", [*flags, "-mavx512bf16"]
        return "avx512", flags
    if {"avx2", "fma"} <= f:
        return "avx2", [
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY=AVX2",
            "-DCPU_CAPABILITY_AVX2",
        ]
    return "generic", []


def _build_dir(name: str) -> Path:
    root = (
        os.environ.get("XMOE_NATIVE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xmoe" / "native_ffn"
    )
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # the PyPI package ships the binary

        dirs.insert(0, str(ninja.BIN_DIR))
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


def _load() -> ModuleType | None:
    """Build (or load the cached build of) the extension once per process."""
    global _ext, _status
    with _lock:
        if _status is not None:
            return _ext
        if os.environ.get("XMOE_NATIVE", "1") == "0":
            _status = "disabled (XMOE_NATIVE=0)"
            return None
        tag, flags = _isa()
        # at::parallel_for is inline OpenMP: without -fopenmp it runs serially
        cflags = ["-O3", "-std=c++17", "-fopenmp", *flags]
        key = hashlib.sha256(
            _SRC.read_bytes() + " ".join(cflags).encode() + torch.__version__.encode()
        ).hexdigest()[:12]
        name = f"xmoe_native_ffn_{tag}_{key}"
        try:
            from torch.utils.cpp_extension import load

            _ensure_ninja_on_path()
            _ext = load(
                name,
                [str(_SRC)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_dir(name)),
                verbose=False,
            )
            _status = f"built ({tag}): {_ext.isa()}"
        except Exception as err:  # no compiler, no ninja, unsupported platform...
            _ext = None
            _status = f"unavailable: build failed ({type(err).__name__}: {str(err)[-300:]})"
            warnings.warn(
                f"xmoe native expert kernel {_status}; using the segment kernel", stacklevel=3
            )
        return _ext


def native_available() -> bool:
    """Whether the native kernel is built and enabled (builds it on first call)."""
    return _load() is not None


def native_status() -> str:
    """One line: built (and which instruction path for fp32 and bf16), disabled, or why not."""
    _load()
    return str(_status)


# ------------------------------------------------------------------------------------------
# Prepacked weights, cached per weight version
# ------------------------------------------------------------------------------------------


class PackCache:
    """Derived forms of weight tensors (cast / packed), valid while the weight is unchanged.

    Keyed on the tensor's identity; an entry is stale once its ``_version`` (bumped by every
    in-place update, e.g. an optimizer step) or ``data_ptr`` (``.data = ...``) changes, and is
    dropped when the tensor dies. Inference tensors have no version counter and are never cached.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], tuple[Any, int, int, Tensor]] = {}

    def get(self, w: Tensor, kind: str, make) -> Tensor:
        try:
            version = w._version
        except RuntimeError:  # inference tensor
            return make()
        key = (id(w), kind)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is w and hit[1] == version and hit[2] == w.data_ptr():
            return hit[3]
        value = make()
        entries = self._entries
        ref = weakref.ref(w, lambda _, k=key: entries.pop(k, None))
        entries[key] = (ref, version, w.data_ptr(), value)
        return value

    def clear(self) -> None:
        self._entries.clear()


_cache = PackCache()


def clear_pack_cache() -> None:
    _cache.clear()


def _f32_weight(w: Tensor) -> Tensor:
    if w.dtype == torch.float32 and w.is_contiguous():
        return w.detach()
    return _cache.get(w, "f32", lambda: w.detach().float().contiguous())


def _bf16_pack(ext: ModuleType, w: Tensor, trans: bool) -> Tensor:
    make = lambda: ext.pack_weight(w.detach().to(torch.bfloat16), trans)  # noqa: E731
    return _cache.get(w, "bf16t" if trans else "bf16", make)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


# ------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------


def native_ffn(
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

    Args: as :func:`~xmoe.moe.kernels.segment_ffn.segment_ffn`: ``x [A, d]`` sorted by expert,
    ``counts [E]`` int64, ``expert_idx [A]``, ``w1, w3 [E, d, h]``, ``w2 [E, h, d]``, biases
    ``[E, h] / [E, d]`` or None, ``activation`` in gelu / relu / silu / swiglu, ``row_weight [A]``.
    Returns ``[A, d]`` in ``x``'s dtype. fp32 and bf16 ``x`` run natively (accumulation in fp32);
    other dtypes or devices go to the segment kernel. Differentiable in ``x``, ``row_weight`` and
    all weights and biases; under ``no_grad`` / ``inference_mode`` no autograd node is built.
    """
    ext = _load()
    if ext is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        from xmoe.moe.kernels.segment_ffn import segment_ffn

        return segment_ffn(x, counts, expert_idx, w1, w2, w3, b1, b2, b3, activation, row_weight)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if activation == "swiglu" and w3 is None:
        raise ValueError("swiglu needs w3")
    if activation != "swiglu":
        w3 = b3 = None
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts.to("cpu", torch.int64), 0, out=offsets[1:])
    tensors = (x, row_weight, w1, w2, w3, b1, b2, b3)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _NativeFFN.apply(x, offsets, activation, row_weight, w1, w2, w3, b1, b2, b3)
    with torch.autocast("cpu", enabled=False):
        return _forward(
            ext, x, offsets, activation, row_weight, w1, w2, w3, b1, b2, b3, save=False
        )[0]


def _bf16_native(ext: ModuleType, x: Tensor) -> bool:
    return x.dtype == torch.bfloat16 and ext.has_bf16_kernel


def _forward(ext, x, offsets, activation, rw, w1, w2, w3, b1, b2, b3, save: bool):
    """-> (y, h1, h3): h1 / h3 the fp32 pre-activations (when ``save``)."""
    act = _ACTIVATIONS[activation]
    biases = (_f32(b1), _f32(b2), _f32(b3), _f32(rw))
    if _bf16_native(ext, x):
        packs = [None if w is None else _bf16_pack(ext, w, False) for w in (w1, w2, w3)]
        return ext.forward_bf16(
            x.contiguous(), offsets, w1.shape[2], *packs, *biases, act, save, ROW_TILE_FWD
        )
    ws = [None if w is None else _f32_weight(w) for w in (w1, w2, w3)]
    y, h1, h3 = ext.forward_f32(
        x.detach().float().contiguous(), offsets, *ws, *biases, act, save, ROW_TILE_FWD
    )
    return y.to(x.dtype), h1, h3


class _NativeFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, activation, row_weight, w1, w2, w3, b1, b2, b3):
        ext = _load()
        with torch.autocast("cpu", enabled=False):
            y, h1, h3 = _forward(
                ext, x, offsets, activation, row_weight, w1, w2, w3, b1, b2, b3, save=True
            )
        ctx.save_for_backward(x, offsets, h1, h3, row_weight, w1, w2, w3, b2)
        ctx.activation = activation
        ctx.dtypes = [
            None if t is None else t.dtype for t in (x, row_weight, w1, w2, w3, b1, b2, b3)
        ]
        return y

    @staticmethod
    def backward(ctx, gy):
        ext = _load()
        x, offsets, h1, h3, rw, w1, w2, w3, b2 = ctx.saved_tensors
        # inputs: (x, offsets, activation, row_weight, w1, w2, w3, b1, b2, b3)
        n = ctx.needs_input_grad
        need = [n[0], n[3], n[4], n[5], n[6], n[7], n[8], n[9]]
        act = _ACTIVATIONS[ctx.activation]
        with torch.autocast("cpu", enabled=False):
            if _bf16_native(ext, x):
                packs = [None if w is None else _bf16_pack(ext, w, True) for w in (w1, w2, w3)]
                g = ext.backward_bf16(
                    gy.to(torch.bfloat16),
                    x.contiguous(),
                    offsets,
                    h1,
                    h3,
                    *packs,
                    _f32(b2),
                    _f32(rw),
                    act,
                    need,
                    ROW_TILE_BWD,
                    w1.dtype == torch.bfloat16,  # weight grads straight in bf16 (else fp32)
                )
            else:
                ws = [None if w is None else _f32_weight(w) for w in (w1, w2, w3)]
                g = ext.backward_f32(
                    gy.float(),
                    x.detach().float().contiguous(),
                    offsets,
                    h1,
                    h3,
                    *ws,
                    _f32(b2),
                    _f32(rw),
                    act,
                    need,
                    ROW_TILE_BWD,
                )
        g = [None if t is None else t.to(dt) for t, dt in zip(g, ctx.dtypes)]
        gx, grw, gw1, gw2, gw3, gb1, gb2, gb3 = g
        return gx, None, None, grw, gw1, gw2, gw3, gb1, gb2, gb3
