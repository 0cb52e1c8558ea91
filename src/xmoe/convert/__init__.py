"""Dense → sparse conversion of Hugging Face models (``xmoe convert``).

A pretrained model's FFNs are split into equal slices of neurons (experts) and given a router
fitted on calibration text; at inference a threshold rule keeps, per token, the fewest experts
whose predicted share of activation mass reaches t. See docs/dense-to-sparse.md.

``transformers`` is needed only to load / save models (the ``hf`` extra).
"""

from .adapters import ADAPTERS, FFNSite, find_ffns, install_ffn
from .calibrate import calibration_batches, capture_ffn_inputs
from .convert import (
    ConvertConfig,
    convert_model,
    converted_ffns,
    fit_router,
    set_mode,
    set_threshold,
)
from .ffn import ConvertedFFN, DenseFFN
from .router import SliceRouter, threshold_routing
from .saving import as_sentence_transformer, load_converted, save_converted
from .split import SPLITS, split_neurons

__all__ = [
    "ADAPTERS",
    "SPLITS",
    "ConvertConfig",
    "ConvertedFFN",
    "DenseFFN",
    "FFNSite",
    "SliceRouter",
    "as_sentence_transformer",
    "calibration_batches",
    "capture_ffn_inputs",
    "convert_model",
    "converted_ffns",
    "find_ffns",
    "fit_router",
    "install_ffn",
    "load_converted",
    "save_converted",
    "set_mode",
    "set_threshold",
    "split_neurons",
    "threshold_routing",
]
