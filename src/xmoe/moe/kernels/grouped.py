"""The one ``torch._grouped_mm`` alignment rule, shared by the experts and the kernels."""

from __future__ import annotations

import torch

GROUPED_DTYPES = (torch.float32, torch.bfloat16)


def grouped_mm_supported(dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` takes operands of ``dtype`` whose row strides are ``widths``.

    It needs fp32 or bf16 and 16-byte aligned rows: every width a multiple of 4 (fp32) or
    8 (bf16). For the expert FFN the widths are ``d_model`` and ``d_expert``; the row count of a
    2D operand is free.
    """
    if not hasattr(torch, "_grouped_mm") or dtype not in GROUPED_DTYPES:
        return False
    per_16_bytes = 16 // dtype.itemsize
    return all(n % per_16_bytes == 0 for n in widths)
