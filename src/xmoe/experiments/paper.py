"""The XMoE paper's language-modelling comparison at our scale: equal total expert width, seeds.

``xmoe compare --preset paper --seeds 3`` trains every row of :func:`paper_rows` for each seed
on one base config (``configs/paper.yaml``: a GPT with MoE in every second block), then writes
``results.json``, ``results.md`` and ``pareto.png`` (validation perplexity against active MoE
FLOPs per token, mean ± std over seeds) into the output folder.

The total expert width is fixed at 8·d_ff, scaling the paper's table (Switch 8×3072, top-2
16×1536, XMoE 16×1536 / 32×768 / 64×384) down to d_ff = 512. The grid is resumable: each run
has its own folder ``runs/<row>-s<seed>/``, a run whose ``summary.json`` exists is skipped, and
the result files are rewritten after every run, so an interrupted grid continues where it
stopped.

``xmoe compare --preset paper-ablation --seeds 1`` runs :func:`ablation_rows` the same way: one
seed of XMoE-64 over the choices where the XMoE reference code may differ from xmoe's defaults
(issue 13, part C), the sparsity regularisers and the budget controller. The recipe it chose
(:data:`RECIPE`) is the paper grid's second pass (:func:`recipe_rows`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._checks import check_choice
from .._io import atomic_write, markdown_table

PAPER_CONFIG = "configs/paper.yaml"


@dataclass(frozen=True)
class Row:
    """One configuration of the grid: overrides of the base config, as typed values."""

    name: str
    overrides: dict = field(default_factory=dict)
    note: str = ""
    group: str = ""  # e.g. "second pass": plotted with its own marker and legend entry


def _moe(num_experts: int, d_expert: int, router: str, **extra) -> dict:
    out = {
        "model.moe.num_experts": num_experts,
        "model.moe.d_expert": d_expert,
        "model.moe.router": router,
    }
    out.update({f"model.moe.{k}": v for k, v in extra.items()})
    return out


def paper_rows(d_ff: int = 512, recipe: dict | None = None) -> list[Row]:
    """The rows at total expert width 8·d_ff. ``recipe`` adds ``model.moe`` overrides (typed
    values, e.g. ``{"loss_coefs": {...}}``) to every XMoE row: the second pass of the issue."""
    thr = {"threshold": 0.9}
    xr = {k: v for k, v in (recipe or {}).items()}
    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)  # experts of width d_ff/8 at top-2's FLOPs
    return [
        Row("dense", {"model.moe_every": 0}, "dense FFN of width d_ff in every block"),
        Row(
            "switch",
            _moe(8, d_ff, "switch", router_options={}, capacity_factor=1.25),
            "top-1, cf 1.25",
        ),
        Row("top2", _moe(16, d_ff // 2, "topk", router_options={"k": 2}), "the paper's top-k"),
        Row("xmoe16", _moe(16, d_ff // 2, "threshold", router_options=thr, **xr)),
        Row("xmoe32", _moe(32, d_ff // 4, "threshold", router_options=thr, **xr)),
        Row("xmoe64", _moe(64, d_ff // 8, "threshold", router_options=thr, **xr)),
        Row(
            "xmoe64+soft_count",
            _moe(
                64,
                d_ff // 8,
                "threshold",
                router_options=thr,
                **{**xr, "loss_coefs": {**xr.get("loss_coefs", {}), "soft_count": 0.01}},
            ),
            "sparsity regulariser",
        ),
        Row(
            "xmoe64@top2_flops",
            _moe(
                64,
                d_ff // 8,
                "threshold",
                router_options={**thr, "target_experts_per_token": top2_ept},
                **xr,
            ),
            f"budget controller: {top2_ept:g} experts/token = top-2's active FLOPs",
        ),
        *recipe_rows(d_ff),
    ]


RECIPE = {"loss_coefs": {"soft_count": 0.01}}
"""The second pass's XMoE recipe (``model.moe`` overrides), chosen by the ``paper-ablation``
preset (docs/results.md): the ``soft_count`` sparsity loss at 0.01 on xmoe's defaults. XMoE-64
with it alone is the first pass's ``xmoe64+soft_count`` row."""


def recipe_rows(d_ff: int = 512, recipe: dict | None = None) -> list[Row]:
    """The second pass: XMoE-64 with ``recipe`` (default :data:`RECIPE`) held at top-2's active
    FLOPs by the budget controller."""
    recipe = RECIPE if recipe is None else recipe
    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)
    opts = {"threshold": 0.9, "target_experts_per_token": top2_ept}
    return [
        Row(
            "xmoe64+recipe@top2_flops",
            _moe(64, d_ff // 8, "threshold", router_options=opts, **recipe),
            f"recipe + budget controller at {top2_ept:g} experts/token",
            group="second pass (recipe)",
        ),
    ]


def ablation_rows(d_ff: int = 512, d_model: int = 128) -> list[Row]:
    """Part C of issue 13: XMoE-64 (64 experts of width d_ff/8, t = 0.9) with one choice changed
    per row against xmoe's defaults, then the sparsity regularisers and the budget controller.

    xmoe's defaults already match three of the reference code's choices (f_i of the load-balance
    loss from each token's top-1 argmax, coefficient 0.01, raw-probability combine weights:
    ``balance_over="top1"``, ``loss_coefs.load_balance``, ``renormalize=False``), so they need
    no row; the reference's capacity factor 8 and nn.Linear init (kaiming-uniform, std
    1/sqrt(3·d_model)) are rows of their own and, together, ``reference``.
    """
    linear_std = 1.0 / math.sqrt(3 * d_model)  # nn.Linear's U(-1/sqrt(d), 1/sqrt(d))

    def x64(router_options: dict | None = None, **extra) -> dict:
        opts = {"threshold": 0.9, **(router_options or {})}
        return _moe(64, d_ff // 8, "threshold", router_options=opts, **extra)

    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)
    return [
        Row(
            "default",
            x64(),
            "xmoe: f_i from top-1 argmax, coef 0.01, dropless, init 3/sqrt(d), raw probs",
        ),
        Row("cf8", x64(capacity_factor=8.0), "reference: train capacity factor 8 (drops)"),
        Row(
            "linear_init",
            x64({"init_std": round(linear_std, 5)}),
            f"reference: nn.Linear init std 1/sqrt(3d) = {linear_std:.3f}",
        ),
        Row(
            "reference",
            x64({"init_std": round(linear_std, 5)}, capacity_factor=8.0),
            "the reference's choices together (cf 8 + nn.Linear init)",
        ),
        Row("soft_count=0.003", x64(loss_coefs={"soft_count": 0.003}), "sparsity regulariser"),
        Row("soft_count=0.01", x64(loss_coefs={"soft_count": 0.01}), "sparsity regulariser"),
        Row("entropy=0.01", x64(loss_coefs={"entropy": 0.01}), "sparsity regulariser"),
        Row(
            "budget=2",
            x64({"target_experts_per_token": 2.0}),
            f"budget controller: 2 experts/token = {2 / top2_ept:g}x top-2's FLOPs",
        ),
        Row(
            f"budget={top2_ept:g}",
            x64({"target_experts_per_token": top2_ept}),
            "budget controller at top-2's active FLOPs",
        ),
    ]


PRESETS = ("paper", "paper-ablation")


def preset_rows(preset: str, d_ff: int, d_model: int) -> list[Row]:
    """The rows of ``xmoe compare --preset NAME`` for a base config's d_ff and d_model."""
    check_choice("preset", preset, PRESETS)
    if preset == "paper-ablation":
        return ablation_rows(d_ff, d_model)
    return paper_rows(d_ff)


def run_grid(
    rows: list[Row],
    seeds: list[int],
    out_dir: Path,
    *,
    config: str | None = PAPER_CONFIG,
    overrides: dict | None = None,
    progress: bool = True,
    command: str = "",
    train_fn: Callable | None = None,
) -> list[dict]:
    """Train every (row, seed) not finished yet; returns the per-run records (all runs)."""
    from ..train import train
    from ..train.config import load_config

    train_fn = train_fn or train
    out_dir.mkdir(parents=True, exist_ok=True)
    # Validate every configuration before the first run starts.
    planned = []
    for row in rows:
        for seed in seeds:
            layers = [{"train.time_limit_s": 0.0}, overrides or {}, row.overrides]
            cfg = load_config(config, *layers, {"train.seed": seed})
            planned.append((row, seed, cfg))
    records = []
    for row, seed, cfg in planned:
        run_dir = out_dir / "runs" / f"{_safe(row.name)}-s{seed}"
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        else:
            print(f"== {row.name} seed {seed} -> {run_dir}")
            summary = train_fn(cfg, run_dir, overwrite=True, progress=progress)
        records.append(run_record(row, seed, summary, cfg.model.d_model, run_dir))
        write_grid(out_dir, records, rows, command)
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


def write_grid(out_dir: Path, records: list[dict], rows: list[Row], command: str) -> list[Path]:
    """``results.json`` (every run and the aggregate), ``results.md`` and ``pareto.png``."""
    table = aggregate(records, rows)
    atomic_write(
        out_dir / "results.json",
        json.dumps({"command": command, "rows": table, "runs": records}, indent=1),
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
