"""PNG views of a run from its ``metrics.jsonl`` (``xmoe plot RUN``): the loss and perplexity
curves (train and validation) and the experts per token of each MoE layer over training."""

from __future__ import annotations

import io
import math
from pathlib import Path

from .._io import atomic_write
from .run_dir import RunDir


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(step, value)]`` of the plotted series, in step order; a resumed run's
    repeated steps count once (the later record wins)."""
    series: dict[str, dict[int, float]] = {}

    def put(name: str, step: int, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            series.setdefault(name, {})[step] = float(value)

    for r in records:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if r.get("split") == "train":
            loss = r.get("lm_loss", r.get("loss"))
            put("train_loss", step, loss)
            if isinstance(loss, (int, float)):
                put("train_ppl", step, math.exp(min(loss, 50.0)))
            for i, v in enumerate(r.get("experts_per_token") or []):
                put(f"train_ept_layer{i}", step, v)
        elif r.get("split") == "val":
            put("val_loss", step, r.get("val_loss"))
            put("val_ppl", step, r.get("val_ppl"))
            for i, v in enumerate(r.get("val_experts_per_token") or []):
                put(f"val_ept_layer{i}", step, v)
    return {name: sorted(points.items()) for name, points in series.items()}


def plot_run(run: str | Path | RunDir, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``loss.png``, ``perplexity.png`` and (MoE runs) ``experts_per_token.png`` into
    ``out_dir`` (default ``<run>/plots``); returns the files written."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.path.is_dir():
        raise ValueError(f"run dir {str(run.path)!r} does not exist or is not a folder")
    if not run.metrics_path.is_file():
        raise ValueError(f"run dir {str(run.path)!r} has no metrics.jsonl (not an xmoe run?)")
    data = curves(run.read_metrics())
    if not data:
        raise ValueError(f"{run.metrics_path} holds no training or validation records yet")
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else run.path / "plots"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ylabel, keys, log in (
        ("loss.png", "loss (nats/token)", ("train_loss", "val_loss"), False),
        ("perplexity.png", "perplexity", ("train_ppl", "val_ppl"), True),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key in keys:
            if key in data:
                steps, values = zip(*data[key])
                style = "-" if key.startswith("train") else "o-"
                ax.plot(steps, values, style, label=key.split("_")[0], markersize=3)
        if log:
            ax.set_yscale("log")
        _finish(ax, ylabel, f"{run.path.name}: {ylabel.split(' ')[0]}")
        written.append(_save(fig, out / name, plt))
    layers = sorted({int(k.rsplit("layer", 1)[1]) for k in data if "_ept_layer" in k})
    if layers:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i in layers:
            line = None
            if f"train_ept_layer{i}" in data:
                steps, values = zip(*data[f"train_ept_layer{i}"])
                (line,) = ax.plot(steps, values, "-", label=f"MoE layer {i}", linewidth=1)
            if f"val_ept_layer{i}" in data:
                steps, values = zip(*data[f"val_ept_layer{i}"])
                color = line.get_color() if line is not None else None
                ax.plot(steps, values, "o--", color=color, markersize=3, linewidth=0.8)
        _finish(ax, "experts per token", f"{run.path.name}: experts/token (dashed: val)")
        written.append(_save(fig, out / "experts_per_token.png", plt))
    return written


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("xmoe plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path, plt) -> Path:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())
