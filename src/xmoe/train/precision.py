"""``train.precision``: fp32, or bf16 autocast with fp32 master weights and fp32 routers.

``auto`` picks bf16 only where the hardware computes it natively: on CPU when the processor has
AVX-512 BF16 or AMX (there a bf16 GEMM is 3-10x an fp32 one), on CUDA when the device supports
bf16. On an AVX2-only CPU bf16 matmuls are emulated and 40-80x slower than fp32, so ``auto``
stays in fp32 there. The parameters and the optimizer state stay fp32 either way; under
autocast the routers still compute their scores in fp32 (``LinearRouter.logits``).
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX-BF16 instructions (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """``"fp32"`` or ``"bf16"`` for a configured precision on a device type."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device_type: str = "cpu"):
    """The context the forward passes run in: bf16 autocast, or nothing for fp32."""
    if resolve_precision(precision, device_type) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)
