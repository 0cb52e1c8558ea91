"""Hand-written compute kernels (autograd Functions) used by the expert backends."""

from .segment_ffn import segment_ffn

__all__ = ["segment_ffn"]
