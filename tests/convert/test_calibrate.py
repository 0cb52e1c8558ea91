"""Calibration batches (convert/calibrate.py)."""

from __future__ import annotations

import pytest
import torch

from xmoe.convert import (
    calibration_batches,
)


def test_calibration_batches_stop_at_the_token_budget_and_group_by_length():
    class Tok:  # a text's tokens = its words; pads to the longest text of the call
        def __call__(self, texts, **kw):
            single = isinstance(texts, str)
            texts = [texts] if single else texts
            n = max(len(t.split()) for t in texts)
            ids = torch.ones(len(texts), n, dtype=torch.long)
            mask = torch.tensor([[1] * len(t.split()) + [0] * (n - len(t.split())) for t in texts])
            if single:
                return {"input_ids": ids[0].tolist()}
            return {"input_ids": ids, "attention_mask": mask}

    texts = ["a " * k for k in (5, 1, 5, 1, 1, 1, 9, 9)]
    batches = calibration_batches(Tok(), texts, calib_tokens=14, batch_size=3)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 14  # stops after 6 texts
    assert [b["input_ids"].shape for b in batches] == [(3, 1), (3, 5)]  # grouped: no padding
    with pytest.raises(ValueError, match="calibration text has only"):
        calibration_batches(Tok(), texts[:3], calib_tokens=30)
