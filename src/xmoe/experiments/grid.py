"""A resumable grid of training runs (rows × seeds), summarised as mean ± std over seeds.

:func:`run_grid` trains every (row, seed) of a grid into ``OUT/runs/<row>-s<seed>/`` and
rewrites ``results.json``, ``results.md`` and ``pareto.png`` (validation perplexity against
active MoE FLOPs) after every run, so an interrupted grid continues where it stopped.

A run counts as finished when its folder holds ``summary.json``, or, when it has no folder at
all, when ``results.json`` holds a record of the same row and seed whose ``config_digest``
equals the planned configuration's (:func:`config_digest`). The second rule lets a fresh clone,
which has the committed result files but not the git-ignored run folders, rerun only the runs
that are missing or whose configuration changed. A folder without ``summary.json`` is an
interrupted run: it trains again. The rows themselves live in :mod:`xmoe.experiments.paper`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write, markdown_table

# Keys that change how fast a run goes, not what it computes.
_RUNTIME_KEYS = ("threads", "progress")


@dataclass(frozen=True)
class Row:
    """One configuration of the grid: overrides of the base config, as typed values."""

    name: str
    overrides: dict = field(default_factory=dict)
    note: str = ""
    group: str = ""  # e.g. "second pass": plotted with its own marker and legend entry


def config_digest(cfg) -> str:
    """A short hash of a run's resolved configuration (a ``RunConfig``), without the keys that
    only change its speed (``train.threads``). Equal digests train the same model."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in _RUNTIME_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_runs(out_dir: Path) -> dict[tuple[str, int], dict]:
    """The per-run records of ``out_dir/results.json``, by (row, seed); {} if there is none."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text())["runs"]
        return {(r["row"], r["seed"]): r for r in runs}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a grid results file ({err!r})") from err


def run_grid(
    rows: list[Row],
    seeds: list[int],
    out_dir: Path,
    *,
    config: str | None,
    overrides: dict | None = None,
    progress: bool = True,
    command: str = "",
    train_fn: Callable | None = None,
    table_rows: list[Row] | None = None,
) -> list[dict]:
    """Train every (row, seed) not finished yet; returns the per-run records of the plan.

    The result files cover ``table_rows`` (default: ``rows``) over every recorded run, so a
    ``--rows`` subset of a preset adds to its table instead of replacing it."""
    table_rows = rows if table_rows is None else table_rows
    from ..train import train
    from ..train.config import load_config

    train_fn = train_fn or train
    recorded = recorded_runs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Validate every configuration before the first run starts.
    planned = []
    for row in rows:
        for seed in seeds:
            layers = [{"train.time_limit_s": 0.0}, overrides or {}, row.overrides]
            cfg = load_config(config, *layers, {"train.seed": seed})
            planned.append((row, seed, cfg))
    # Records of runs outside this plan (e.g. other --rows) stay in results.json.
    planned_keys = {(row.name, seed) for row, seed, _ in planned}
    kept = [r for key, r in recorded.items() if key not in planned_keys]
    records = []
    for row, seed, cfg in planned:
        run_dir = out_dir / "runs" / f"{_safe(row.name)}-s{seed}"
        summary_path = run_dir / "summary.json"
        digest = config_digest(cfg)
        old = recorded.get((row.name, seed))
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            saved = run_dir / "config.yaml"  # the digest of what that run really trained
            digest = config_digest(load_config(saved)) if saved.exists() else digest
        elif not run_dir.exists() and old is not None and old.get("config_digest") == digest:
            print(f"== {row.name} seed {seed}: recorded in results.json, skipped")
            records.append(old)
            continue
        else:
            print(f"== {row.name} seed {seed} -> {run_dir}")
            summary = train_fn(cfg, run_dir, overwrite=True, progress=progress)
        record = run_record(row, seed, summary, cfg.model.d_model, run_dir)
        records.append({**record, "config_digest": digest})
        write_grid(out_dir, records, table_rows, command, kept=kept)
    if records or kept:
        write_grid(out_dir, records, table_rows, command, kept=kept)
    return records


def run_record(
    row: Row, seed: int, summary: dict, d_model: int, run_dir: Path | None = None
) -> dict:
    """The figures of one run the tables need. With ``run_dir``, the last training log line of
    its ``metrics.jsonl`` adds the training drop fraction and the (controlled) threshold."""
    ratio = summary.get("moe_compute_ratio")
    d_ff = summary["d_ff"]
    if ratio is None:  # the dense row: its FFN is the reference
        ratio = 1.0
    return {
        "row": row.name,
        "seed": seed,
        "val_ppl": summary["val_ppl"],
        "moe_compute_ratio": ratio,
        # Active FLOPs per token of one MoE layer (2 GEMMs, 2 FLOPs per multiply-add).
        "moe_gflops_per_token": ratio * 4 * d_model * d_ff / 1e9,
        "experts_per_token": summary.get("experts_per_token"),
        "experts_per_token_per_layer": summary.get("experts_per_token_per_layer"),
        "load_imbalance": summary.get("load_imbalance"),
        "tokens_per_s": summary.get("train_tokens_per_s"),
        "train_time_s": summary.get("train_time_s"),
        **_last_train_figures(run_dir),
    }


def _last_train_figures(run_dir: Path | None) -> dict:
    """``train_dropped_fraction`` and ``final_threshold`` (means over the MoE layers) of the
    last training line of ``run_dir/metrics.jsonl``; None where absent."""
    out = {"train_dropped_fraction": None, "final_threshold": None}
    path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if path is None or not path.exists():
        return out
    last = None
    for line in path.read_text().splitlines():
        if '"split": "train"' in line:
            last = line
    if last is None:
        return out
    record = json.loads(last)
    for key, name in (
        ("dropped_fraction", "train_dropped_fraction"),
        ("threshold", "final_threshold"),
    ):
        value = record.get(key)
        if isinstance(value, list) and value:
            out[name] = statistics.fmean(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


AVERAGED = (
    "moe_compute_ratio",
    "experts_per_token",
    "load_imbalance",
    "tokens_per_s",
    "train_dropped_fraction",
    "final_threshold",
)


def aggregate(records: list[dict], rows: list[Row]) -> list[dict]:
    """Mean ± std over seeds, one line per row (in grid order)."""
    out = []
    for row in rows:
        runs = [r for r in records if r["row"] == row.name]
        if not runs:
            continue
        ppl = [r["val_ppl"] for r in runs]
        line = {
            "row": row.name,
            "note": row.note,
            "group": row.group,
            "seeds": len(runs),
            "val_ppl": statistics.fmean(ppl),
            "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
        }
        for key in AVERAGED:
            values = [r[key] for r in runs if r.get(key) is not None]
            line[key] = statistics.fmean(values) if values else None
        layers = [
            r["experts_per_token_per_layer"] for r in runs if r.get("experts_per_token_per_layer")
        ]
        line["per_layer"] = (
            " / ".join(f"{statistics.fmean(v):.2f}" for v in zip(*layers)) if layers else None
        )
        out.append(line)
    return out


COLUMNS = [
    ("row", "row", "{}"),
    ("seeds", "seeds", "{}"),
    ("val_ppl", "val ppl (mean)", "{:.2f}"),
    ("val_ppl_std", "± std", "{:.2f}"),
    ("moe_compute_ratio", "MoE FLOPs vs dense FFN", "{:.3f}"),
    ("experts_per_token", "experts/token", "{:.2f}"),
    ("per_layer", "per MoE layer", "{}"),
    ("load_imbalance", "load imbalance (max/mean)", "{:.2f}"),
    ("train_dropped_fraction", "train drops", "{:.3f}"),
    ("final_threshold", "final t", "{:.4f}"),
    ("tokens_per_s", "train tokens/s", "{:.0f}"),
    ("note", "note", "{}"),
]


def write_grid(
    out_dir: Path, records: list[dict], rows: list[Row], command: str, kept: tuple | list = ()
) -> list[Path]:
    """``results.json`` (every run and the aggregate), ``results.md`` and ``pareto.png``. The
    table covers ``rows`` over ``records`` and ``kept`` (runs recorded earlier, outside this
    plan); every record is stored in the json."""
    table = aggregate([*records, *kept], rows)
    atomic_write(
        out_dir / "results.json",
        json.dumps({"command": command, "rows": table, "runs": [*records, *kept]}, indent=1),
    )
    text = (f"Command: `{command}`\n\n" if command else "") + markdown_table(table, COLUMNS)
    atomic_write(out_dir / "results.md", text)
    files = [out_dir / "results.json", out_dir / "results.md"]
    png = plot_pareto(table, out_dir / "pareto.png")
    return files + ([png] if png else [])


def plot_pareto(table: list[dict], path: Path) -> Path | None:
    """Validation perplexity vs active MoE FLOPs (× the dense FFN), error bars = std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [r for r in table if r.get("moe_compute_ratio") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = list(dict.fromkeys(r.get("group") or "" for r in points))
    markers = dict(zip(groups, "osD^v"))
    for r in points:
        group = r.get("group") or ""
        ax.errorbar(
            r["moe_compute_ratio"],
            r["val_ppl"],
            yerr=r["val_ppl_std"],
            fmt=markers.get(group, "o"),
            capsize=3,
        )
        ax.annotate(
            r["row"],
            (r["moe_compute_ratio"], r["val_ppl"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    if len(groups) > 1:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker=markers[g], color="grey", linestyle="", label=g or "first pass")
            for g in groups
        ]
        ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel("active MoE FLOPs per token (x dense FFN)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("equal total expert width 8·d_ff; mean ± std over seeds")
    ax.grid(alpha=0.3)
    if (
        max(r["moe_compute_ratio"] for r in points) / min(r["moe_compute_ratio"] for r in points)
        > 8
    ):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = ax.get_xlim()
        ax.set_xticks([v for v in (0.05, 0.1, 0.2, 0.5, 1, 2, 4, 8) if lo <= v <= hi])
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
