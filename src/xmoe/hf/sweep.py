"""``xmoe hf-sweep``: perplexity against compute on one HF MoE model, as a table and a plot.

Rows: the native top-k, other k, global thresholds, compute budgets (per-layer t fitted on the
calibration text to a fraction of the native top-k FLOPs) and the entropy-k baseline fitted to
the same budgets (so the two adaptive rules are compared at matched mean experts/token).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import atomic_write, markdown_table
from .evaluate import environment
from .session import Point, Session, SessionConfig


@dataclass
class SweepConfig:
    session: SessionConfig
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
    flop_fractions: tuple[float, ...] = (0.5, 0.625, 0.75, 0.875)
    topk: tuple[int, ...] = (1,)  # other fixed k to include
    entropy: bool = True  # the entropy-k baseline at each budget
    capped: bool = True  # also each budget with the threshold capped at the native k
    global_t: bool = True  # also each budget met by one t for all layers (their mean)
    within_topk: bool = True  # also each budget with the threshold within the native top-k
    timing: bool = True
    timing_fraction: float = 0.75  # budget timed against native and HF
    repeats: int = 5
    points: list[Point] = field(default_factory=list)  # filled by sweep_points


def sweep_points(cfg: SweepConfig, has_section: bool, native_k: int) -> list[Point]:
    points = [Point("native")]
    if has_section:
        points.append(Point("restored"))
    points += [Point("topk", k=k) for k in cfg.topk]
    points += [Point("threshold", threshold=t) for t in cfg.thresholds]
    for f in cfg.flop_fractions:
        points.append(Point("budget", flop_fraction=f))
        if cfg.capped:
            points.append(Point("budget", flop_fraction=f, max_experts=native_k))
        if cfg.global_t:
            points.append(Point("budget", flop_fraction=f, per_layer=False))
        if cfg.within_topk:
            points.append(Point("budget", flop_fraction=f, candidates=native_k))
            points.append(Point("budget", flop_fraction=f, candidates=native_k, per_layer=False))
        if cfg.entropy:
            points.append(Point("entropy_k", flop_fraction=f))
    return points


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Evaluate every point; returns ``{"rows", "timing", "native_check", "environment", ...}``."""
    session = Session(cfg.session)
    section = getattr(session.model.config, "xmoe", None) or {}
    has_section = bool(section) and not section.get("exact", False)  # exact: restored = native
    native_check = session.native_check()
    if cfg.session.reference:
        log(f"native routing vs HF: max |logit diff| = {native_check:.2e}")
    rows = []
    native_k = session.blocks[0].native_options["k"]
    for point in sweep_points(cfg, has_section, native_k):
        if point.rule == "topk" and point.k == native_k:
            continue
        row = session.evaluate(point)
        row["series"] = (
            point.rule
            + (" capped" if point.max_experts is not None else "")
            + (" top-k" if point.candidates is not None else "")
            + ("" if point.per_layer else " global")
        )
        rows.append(row)
        log(
            f"{row['rule']:>9} {row['setting']:>20}  experts/token "
            f"{row['mean_experts_per_token']:.3f}  FLOPs {row['expert_flop_fraction']:.1%}  "
            f"ppl {row['ppl']:.3f}"
        )
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_delta"] = r["ppl"] / base - 1
    timing = {}
    if cfg.timing:
        f = cfg.timing_fraction
        timed = {"native": Point("native"), f"budget {f:.0%}": Point("budget", flop_fraction=f)}
        if cfg.within_topk and cfg.global_t:
            timed[f"budget {f:.0%} top-k global"] = Point(
                "budget", flop_fraction=f, candidates=native_k, per_layer=False
            )
        if cfg.entropy:
            timed[f"entropy_k {f:.0%}"] = Point("entropy_k", flop_fraction=f)
        timed |= {f"topk k={k}": Point("topk", k=k) for k in cfg.topk if k != native_k}
        timing = session.timing(timed, repeats=cfg.repeats)
        for name, sec in timing.items():
            log(f"forward {name:>22}: {sec * 1e3:.1f} ms")
    return {
        "model": str(cfg.session.model),
        "config": {k: v for k, v in asdict(cfg).items() if k != "points"},
        "seq_len": session.seq_len,
        "eval_tokens": rows[0]["tokens"],
        "native_check": native_check,
        "rows": rows,
        "timing_seconds": timing,
        "timing_batch": [min(cfg.session.batch_size, session.windows.shape[0]), session.seq_len],
        "environment": environment(),
    }


COLUMNS = (
    ("rule", "rule", "{}"),
    ("setting", "setting", "{}"),
    ("mean_experts_per_token", "experts/token", "{:.3f}"),
    ("layers", "per layer", "{}"),
    ("expert_flop_fraction", "FLOPs vs top-k", "{:.1%}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_delta", "Δppl", "{:+.2%}"),
)


def format_sweep(result: dict) -> str:
    """Markdown: the sweep table, then the timing table (with the environment)."""
    rows = [
        {**r, "layers": " ".join(f"{v:.2f}" for v in r["experts_per_token"])}
        for r in result["rows"]
    ]
    out = [markdown_table(rows, COLUMNS).rstrip("\n")]
    timing = result.get("timing_seconds") or {}
    if timing:
        env = result["environment"]
        b, t = result["timing_batch"]
        out.append(
            f"Wall-clock on a [{b}, {t}] batch, median of {result['config']['repeats']} "
            f"interleaved repeats in one process; CPU {env['cpu']} (bf16 flags: "
            f"{env['cpu_bf16_flags']}), {env['threads']} thread(s), torch {env['torch']}, "
            f"transformers {env['transformers']}. `model`: the whole forward; `blocks`: the MoE "
            "blocks alone on their inputs."
        )
        out.append(format_timing(timing))
    return "\n\n".join(out) + "\n"


def format_timing(timing: dict[str, float]) -> str:
    """Markdown table of ``{"model: ...": s, "blocks: ...": s}``; each part's speed is relative
    to HF's default experts implementation on the same part."""
    rows = []
    for part in ("model", "blocks"):
        names = [k for k in timing if k.startswith(part + ": ")]
        ref = next((timing[k] for k in names if k.endswith("(default)")), None)
        for k in names:
            v = timing[k]
            rows.append({"part": part, "variant": k.split(": ", 1)[1], "ms": v * 1e3,
                         "vs": ref / v if ref else None})  # fmt: skip
    cols = (
        ("part", "part", "{}"),
        ("variant", "variant", "{}"),
        ("ms", "ms", "{:.2f}"),
        ("vs", "speed vs HF default", "{:.2f}x"),
    )
    return markdown_table(rows, cols).rstrip("\n")


def plot_sweep(result: dict, path: Path) -> None:
    """PNG of perplexity against mean routed experts/token, one series per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {
        "native": ("*", "k", "native top-k"),
        "restored": ("P", "tab:purple", "restored (xmoe section)"),
        "topk": ("s", "tab:gray", "top-k"),
        "threshold": ("o", "tab:blue", "threshold t (global)"),
        "budget": ("D", "tab:green", "threshold, per-layer budget"),
        "budget capped": ("v", "tab:olive", "threshold, per-layer budget, <= native k"),
        "budget global": ("X", "tab:cyan", "threshold, one t for all layers at the budget"),
        "budget top-k": ("p", "tab:orange", "threshold within native top-k, per-layer budget"),
        "budget top-k global": ("h", "tab:brown", "threshold within native top-k, one t"),
        "entropy_k": ("^", "tab:red", "entropy-k (same budget)"),
    }
    for rule, (marker, color, label) in styles.items():
        pts = sorted(
            (r["mean_experts_per_token"], r["ppl"])
            for r in result["rows"]
            if r.get("series", r["rule"]) == rule
        )
        if not pts:
            continue
        xs, ys = zip(*pts)
        line = "" if rule in ("native", "restored", "topk") else "-"
        ax.plot(xs, ys, marker=marker, color=color, linestyle=line, label=label, ms=7)
    native = next((r for r in result["rows"] if r["rule"] == "native"), None)
    if native is not None:  # the target: within 2% of native ppl at 75% of its FLOPs
        ax.axhline(native["ppl"] * 1.02, color="k", lw=0.8, ls="--", label="native ppl + 2%")
        ax.axvline(native["mean_experts_per_token"] * 0.75, color="k", lw=0.8, ls=":",
                   label="75% of native FLOPs")  # fmt: skip
    ax.set_xlabel("mean routed experts per token")
    ax.set_ylabel("perplexity")
    model = Path(result["model"])
    ax.set_title(f"{model.parent.name}/{model.name}" if model.parent.name else model.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_sweep(result: dict, out_dir: Path) -> dict[str, Path]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "sweep.json",
        "md": out_dir / "sweep.md",
        "png": out_dir / "sweep.png",
    }
    atomic_write(paths["json"], json.dumps(result, indent=2, default=float) + "\n")
    atomic_write(paths["md"], format_sweep(result))
    plot_sweep(result, paths["png"])
    return paths
