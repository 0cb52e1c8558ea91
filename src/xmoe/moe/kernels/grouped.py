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


# torch._grouped_mm takes int32 end offsets: past this many rows they would wrap silently (and
# the CPU kernel then returns wrong rows with no error).
MAX_GROUPED_ROWS = 2**31 - 1


def fits_grouped_offsets(rows: int) -> bool:
    """Whether ``rows`` kept rows can be addressed by ``torch._grouped_mm``'s int32 offsets."""
    return rows <= MAX_GROUPED_ROWS


def grouped_offsets(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """The int32 end offsets of the segments of ``counts: [E]`` (summing to ``rows``) for
    ``torch._grouped_mm``; a ``ValueError`` when ``rows`` does not fit in int32."""
    if not fits_grouped_offsets(rows):
        raise ValueError(
            f"{rows} kept rows do not fit torch._grouped_mm's int32 segment offsets (at most "
            f"{MAX_GROUPED_ROWS}); use backend='segment' or 'loop', or fewer tokens per call"
        )
    return torch.cumsum(counts, 0).to(torch.int32)
