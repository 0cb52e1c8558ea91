"""``task_options`` of ``xmoe train --task exit`` (both backbones)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._checks import check_choice, check_int, check_range
from ..exit.heads import IM_KINDS

BACKBONES = ("minilm", "gpt")
LABELS = ("work", "genre")
POOLINGS = ("mean", "cls")


@dataclass
class ExitOptions:
    backbone: str = "minilm"
    label: str = "work"  # minilm: what a passage is classified by
    lines: int = 4  # lines per passage
    max_per_work: int = 200  # passages per work (caps the backbone's feature pass)
    pooling: str = "mean"  # per-layer feature: mean over tokens (as sentence-transformers) or CLS
    max_length: int = 128  # tokenizer truncation
    embed_batch: int = 64
    # a run dir (or its data/ folder) whose cached data this run may copy: the MiniLM
    # features, or (gpt) the tokenizer and token arrays
    features_from: str | None = None
    # JEI-DNN cost trade-offs: one member per value (cost normalised to 1 at the last exit)
    lambdas: list = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    im_kind: str = "linear"
    im_hidden: int = 256
    gate_hidden: int = 16
    mix: float = 0.1  # uniform share of the IM loss weights (0: pure exit-weighted)
    pos_weight: float = 1.0  # BCE weight of the "leave" targets
    warmup: int = 200  # IM-only steps before the alternation starts
    alternate_every: int = 50  # steps per GM / IM block
    # gpt backbone: the member (index into lambdas) whose exit distribution weights the LM
    # losses; the other lambdas get gates trained on the same exits
    lm_lambda_index: int = 2
    lm_gates: bool = True  # false: the GPT without exits (the 'neither' / 'width-only' rows)
    lm_final_eval_tokens: int = 0  # gpt: cap on the val tokens of the final evaluation; 0: all

    def validate(self) -> None:
        check_choice("task_options.backbone", self.backbone, BACKBONES)
        check_choice("task_options.label", self.label, LABELS)
        check_choice("task_options.pooling", self.pooling, POOLINGS)
        check_choice("task_options.im_kind", self.im_kind, IM_KINDS)
        for name in ("lines", "max_length", "embed_batch", "im_hidden", "gate_hidden"):
            check_int(f"task_options.{name}", getattr(self, name), 1)
        check_int("task_options.max_per_work", self.max_per_work, 3)
        check_int("task_options.warmup", self.warmup, 0)
        check_int("task_options.lm_final_eval_tokens", self.lm_final_eval_tokens, 0)
        check_int("task_options.alternate_every", self.alternate_every, 1)
        check_range("task_options.mix", self.mix, 0.0, 1.0)
        check_range("task_options.pos_weight", self.pos_weight, 0.0, math.inf, low_open=True)
        if not isinstance(self.lambdas, list) or not self.lambdas:
            raise ValueError(f"task_options.lambdas must be a non-empty list, got {self.lambdas!r}")
        for i, lam in enumerate(self.lambdas):
            check_range(f"task_options.lambdas[{i}]", lam, 0.0, math.inf)
        if self.backbone == "gpt":
            n = len(self.lambdas) - 1
            check_int("task_options.lm_lambda_index", self.lm_lambda_index, 0, n)
