"""The conversion sweep (experiments/convert_sweep.py) on a tiny local BERT."""

from __future__ import annotations

import json

import pytest
from hf_tiny import save_local_bert

from xmoe.convert.convert_eval import EvalConfig
from xmoe.experiments.convert_sweep import SweepConfig, run_sweep


def test_sweep_converts_every_e_and_split_and_writes_rows_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    base = save_local_bert(tmp_path / "base")
    cfg = SweepConfig(
        model=str(base),
        experts=[2, 4],
        splits=["random"],
        out=tmp_path / "sweep",
        calib_tokens=200,
        router_steps=3,
        eval=EvalConfig(thresholds=[1.0, 0.5], shakespeare=8, stdlib=4, speed=False),
    )
    logged = []
    result = run_sweep(cfg, log=logged.append)
    rows = result["rows"]
    assert [(r["num_experts"], r["router"], r["threshold"]) for r in rows] == [
        (e, router, t) for e in (2, 4) for router in ("learned", "oracle") for t in (1.0, 0.5)
    ]
    assert all(r["cos_mean"] > 0.9999 for r in rows if r["threshold"] == 1.0)  # t = 1 is exact
    assert len(logged) == 2  # one table per conversion
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "sweep" / "sweep.md").read_text().startswith("| E | split |")
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--experts: 5 does not divide"):
        run_sweep(SweepConfig(model=str(base), experts=[5], out=tmp_path / "bad"))
