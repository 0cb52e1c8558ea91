"""The conversion sweep (``xmoe convert-sweep``): every E x split, both routers over t.

For each number of experts E and neuron split, the base model is converted once (the FFN inputs
are captured from the dense model once, up front) and evaluated at every threshold with the
learned router and the oracle, against the dense model's embeddings. Writes ``sweep.json``
(rewritten after each conversion, so a stopped sweep keeps its rows), ``sweep.md`` (the table)
and a plot (:func:`plot_sweep`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write
from ..convert.calibrate import calibration_batches, capture_ffn_inputs
from ..convert.convert import ConvertConfig, convert_model
from ..convert.data import calibration_texts
from ..convert.evaluate import embed, environment, format_table
from ..convert.pipeline import (
    MINILM,
    ROUTER_MODES,
    EvalConfig,
    check_divides,
    eval_corpus,
    eval_rows,
    load_base,
)
from ..convert.split import SPLITS


@dataclass
class SweepConfig:
    """What the sweep converts and measures.

    Attributes:
        model: ``minilm`` or a local HF model directory.
        experts: the E values (each must divide d_ff).
        splits: neuron splits (:data:`xmoe.convert.split.SPLITS`).
        out: output directory.
        plot: the PNG path (default ``out/sweep.png``).
        calib_tokens, router_steps: as in :class:`~xmoe.convert.convert.ConvertConfig`.
        eval: routers, thresholds, corpus sizes and timing of each evaluation.
    """

    model: str = MINILM
    experts: list[int] = field(default_factory=lambda: [16, 32, 64])
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    out: Path = Path("runs/convert/sweep")
    plot: Path | None = None
    calib_tokens: int = 16384
    router_steps: int = 300
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(thresholds=[1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    )


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> dict:
    """Run the sweep; ``log`` gets each conversion's table as it finishes. Returns the result
    (``rows``, ``model``, ``corpus``, ``environment``, ...) with the written ``paths``."""
    for r in cfg.eval.routers:
        if r not in ROUTER_MODES:
            raise ValueError(f"routers must be among {ROUTER_MODES}, got {r!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path, hf_config, base, tok = load_base(cfg.model)
    check_divides("--experts:", cfg.experts, hf_config)
    progress = cfg.eval.progress
    calib = calibration_batches(tok, calibration_texts(None, 0), cfg.calib_tokens)
    inputs = capture_ffn_inputs(base, calib, cfg.calib_tokens, progress)
    corpus = eval_corpus(tok, cfg.eval.shakespeare, cfg.eval.stdlib)
    with torch.no_grad():
        ref = embed(base, corpus.batches, corpus.order)[0]
    from transformers import AutoModel

    rows = []
    for e in cfg.experts:
        for split in cfg.splits:
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            convert_cfg = ConvertConfig(
                num_experts=e,
                split=split,
                router="learned",
                calib_tokens=cfg.calib_tokens,
                router_steps=cfg.router_steps,
            )
            t0 = time.perf_counter()
            convert_model(model, convert_cfg, inputs=inputs, progress=progress)
            took = time.perf_counter() - t0
            extra = {"split": split, "convert_s": round(took, 1)}
            new = eval_rows(model, ref, corpus, cfg.eval, extra)
            rows += new
            log(format_table(new, cfg.eval.speed))
            atomic_write(out / "sweep.json", json.dumps({"rows": rows}, indent=2) + "\n")
    result = {
        "model": cfg.model,
        "corpus": corpus.info,
        "environment": environment(),
        "calib_tokens": cfg.calib_tokens,
        "router_steps": cfg.router_steps,
        "rows": rows,
    }
    atomic_write(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "sweep.md", format_table(rows, cfg.eval.speed) + "\n")
    plot = Path(cfg.plot) if cfg.plot else out / "sweep.png"
    plot_sweep(rows, plot, title=f"{cfg.model}: dense → sparse conversion")
    return {**result, "paths": [str(out / "sweep.json"), str(out / "sweep.md"), str(plot)]}


def plot_sweep(rows: list[dict], path, title: str = "") -> None:
    """Cosine (top) and top-1 agreement (bottom) against the FFN FLOP fraction, one column per
    E; colour = split, solid = learned router, dashed = oracle; dotted lines mark the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["num_experts"] for r in rows})
    splits = sorted({r["split"] for r in rows})
    colors = dict(zip(splits, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    fig, axes = plt.subplots(2, len(experts), figsize=(4.2 * len(experts), 7), squeeze=False)
    for col, e in enumerate(experts):
        for split in splits:
            for router, style in (("learned", "-"), ("oracle", "--")):
                pts = sorted(
                    (r["ffn_flop_fraction"], r["cos_mean"], r["top1_agreement"])
                    for r in rows
                    if r["num_experts"] == e and r["split"] == split and r["router"] == router
                )
                if not pts:
                    continue
                x = [p[0] for p in pts]
                label = f"{split}, {router}"
                for row in (0, 1):  # row 0: cosine, row 1: top-1 agreement
                    y = [p[row + 1] for p in pts]
                    axes[row][col].plot(
                        x, y, style, marker="o", ms=3, color=colors[split], label=label
                    )
        ax = axes[0][col]
        ax.set_title(f"E = {e}")
        ax.plot([0.3, 0.3], [0.95, 1.0], ":", color="k", lw=1)
        ax.plot([0.5, 0.5], [0.98, 1.0], ":", color="k", lw=1)
        ax.plot([0, 0.3], [0.95, 0.95], ":", color="k", lw=1)
        ax.plot([0, 0.5], [0.98, 0.98], ":", color="k", lw=1)
        ax.set_ylabel("mean cosine vs dense")
        axes[1][col].set_ylabel("top-1 NN agreement")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("FFN FLOP fraction")
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
