"""TensorBoard event files of a run (``train.tensorboard: true``): ``<run>/tensorboard/``.

Each metrics record the loop logs (``metrics.jsonl``) is also written as scalars: loss and
perplexity, learning rate, tokens/s, gradient norm, router losses, and per MoE layer the
experts per token and the load imbalance. ``tensorboard --logdir <run>/tensorboard`` shows
them. The ``tensorboard`` package is optional; asking for event files without it is a clear
error at start-up.
"""

from __future__ import annotations

import math
from pathlib import Path

# train record key -> tag; per-layer lists get "/layer{i}" appended
_TRAIN = {
    "loss": "train/loss",
    "lm_loss": "train/lm_loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm": "train/grad_norm",
    "moe_compute_ratio": "train/moe_compute_ratio",
    "experts_per_token": "experts_per_token/train",
    "load_imbalance": "load_imbalance/train",
    "dropped_fraction": "dropped_fraction/train",
}
_VAL = {
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "val_moe_compute_ratio": "val/moe_compute_ratio",
    "val_experts_per_token": "experts_per_token/val",
    "val_load_imbalance": "load_imbalance/val",
}


def summary_writer_class():
    """torch's ``SummaryWriter``; a ``ValueError`` saying what to install when it is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "train.tensorboard is true but the tensorboard package is not installed "
            f"({exc}); install it (pip install 'xmoe[tb]' or pip install tensorboard) or set "
            "train.tensorboard=false"
        ) from None
    return SummaryWriter


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics record (non-finite and missing values skipped)."""
    out: dict[str, float] = {}
    table = _VAL if record.get("split") == "val" else _TRAIN
    for key, tag in table.items():
        value = record.get(key)
        if isinstance(value, list):
            for i, v in enumerate(value):
                _put(out, f"{tag}/layer{i}", v)
            if value and all(_finite(v) for v in value):
                _put(out, f"{tag}/mean", sum(value) / len(value))
        else:
            _put(out, tag, value)
    if record.get("split") == "train":
        loss = record.get("lm_loss", record.get("loss"))
        if _finite(loss):
            _put(out, "train/ppl", math.exp(min(loss, 50.0)))
        for name, value in (record.get("router_losses") or {}).items():
            _put(out, f"router_losses/{name}", value)
    return out


class TensorBoardLog:
    """Writes metric records to ``log_dir`` as TensorBoard scalars.

    ``purge_step``: the first step a resumed run logs; events an earlier process wrote from
    that step on are hidden, so the curves show each step once.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        writer_class = summary_writer_class()
        self.writer = writer_class(str(log_dir), purge_step=purge_step)

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _put(out: dict, tag: str, value) -> None:
    if _finite(value):
        out[tag] = float(value)
