"""What ``xmoe bench`` reports: the headline ratios against their targets, GFLOP/s, the markdown
summary and the plot. Speed ratios are ``reference time / xmoe time`` (> 1: xmoe faster); the
``threshold_vs_top2`` ratios are time ratios (< 1: the threshold layer is cheaper).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import torch

from .problem import ProblemSpec

XMOE = "xmoe"  # backend="auto": what a user gets (the native kernel on CPU when it is built)
TARGETS = {  # ratio: (comparison, bound)
    "xmoe_vs_dense": (">=", 0.85),  # fp32 fwd+bwd, top-2, vs the equal-FLOP dense FFN
    "fwd_xmoe_vs_dense": (">=", 0.8),
    "bf16_fwd_xmoe_vs_dense": (">=", 0.6),
    "bf16_fwd_xmoe_vs_hf_grouped_mm": (">=", 3.0),
    "bf16_fwdbwd_xmoe_vs_dense": (">=", 0.5),
    "threshold_vs_top2": ("<=", 0.8),  # fp32 fwd+bwd, 1.5 experts/token vs 2
    "bf16_threshold_vs_top2": ("<=", 0.8),
    "decode_threshold_vs_top2": ("<=", 0.8),  # fp32 fwd, the worse of N = 1 and N = 8
    "xmoe_vs_loop": (">=", 5.0),
    "xmoe_vs_hf_grouped_mm": (">=", 1.0),
}
DECODE_TARGET_SIZES = (1, 8)


def meets(value, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def _median(rows, variant, spec: ProblemSpec, dtype="fp32", pass_="fwd+bwd") -> float | None:
    for r in rows:
        key = (r["variant"], r["config"], r["dtype"], r["pass_"])
        if key == (variant, spec.key, dtype, pass_):
            return r["median_ms"]
    return None


def target_ratios(
    rows: list[dict], top2: ProblemSpec, threshold: ProblemSpec
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The issue's ratios at the target config, and GFLOP/s of dense and xmoe beside them."""
    out: dict[str, float] = {}
    med = lambda v, spec, dtype="fp32", pass_="fwd+bwd": _median(rows, v, spec, dtype, pass_)

    def speed(key: str, ref: str, dtype: str, pass_: str) -> None:
        x, t = med(XMOE, top2, dtype, pass_), med(ref, top2, dtype, pass_)
        if x and t:
            out[key] = t / x

    speed("xmoe_vs_dense", "dense", "fp32", "fwd+bwd")
    speed("fwd_xmoe_vs_dense", "dense", "fp32", "fwd")
    speed("bf16_fwd_xmoe_vs_dense", "dense", "bf16", "fwd")
    speed("bf16_fwd_xmoe_vs_hf_grouped_mm", "hf_grouped_mm", "bf16", "fwd")
    speed("bf16_fwdbwd_xmoe_vs_dense", "dense", "bf16", "fwd+bwd")
    speed("xmoe_vs_loop", "loop", "fp32", "fwd+bwd")
    speed("xmoe_vs_hf_grouped_mm", "hf_grouped_mm", "fp32", "fwd+bwd")
    speed("xmoe_vs_segment", "xmoe[segment]", "fp32", "fwd+bwd")
    speed("bf16_fwd_xmoe_vs_segment", "xmoe[segment]", "bf16", "fwd")
    for key, dtype in (("threshold_vs_top2", "fp32"), ("bf16_threshold_vs_top2", "bf16")):
        a, b = med(XMOE, threshold, dtype), med(XMOE, top2, dtype)
        if a and b:
            out[key] = a / b
    cap_top2, cap_thr = med("capacity", top2), med("capacity", threshold)
    if cap_top2 and cap_thr:
        out["capacity_threshold_vs_top2"] = cap_thr / cap_top2
    decode = []
    for r in rows:
        if "decode" not in r["tags"] or r["variant"] != XMOE or r["spec"]["router"] != "top2":
            continue
        thr_spec = ProblemSpec(**{**r["spec"], "router": threshold.router})
        thr = _median(rows, XMOE, thr_spec, r["dtype"], "fwd")
        if thr:
            n = r["spec"]["num_tokens"]
            out[f"decode_n{n}_{r['dtype']}_threshold_vs_top2"] = thr / r["median_ms"]
            if r["dtype"] == "fp32" and n in DECODE_TARGET_SIZES:
                decode.append(thr / r["median_ms"])
    if decode:
        out["decode_threshold_vs_top2"] = max(decode)
    gflops: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["config"] != top2.key or r["variant"] not in ("dense", XMOE, "xmoe[segment]"):
            continue
        s = r["spec"]
        # SwiGLU: 3 GEMMs of 2 * rows * d * h FLOPs forward; backward twice the forward.
        flops = 6 * s["num_tokens"] * r["experts_per_token"] * s["d_expert"] * s["d_model"]
        flops *= 3 if r["pass_"] == "fwd+bwd" else 1
        gflops.setdefault(f"{r['dtype']} {r['pass_']}", {})[r["variant"]] = (
            flops / (r["median_ms"] * 1e-3) / 1e9
        )
    return out, gflops


def cpu_flags() -> list[str]:
    """The SIMD / matrix flags of this CPU that decide which GEMM paths exist."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    keep = ("avx", "amx", "fma", "f16c")
    return sorted({f for f in line.split(":", 1)[-1].split() if f.startswith(keep)})


def environment(quick: bool, command: str, seconds: float, device: str = "cpu") -> dict:
    """Device, CPU model and flags, threads, torch, commit: recorded with every figure."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return dict(
        suite="quick" if quick else "full",
        command=command,
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        cpu=cpu,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=cpu_flags(),
        native_kernel=_native_status(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        git_commit=commit,
        seconds=round(seconds, 1),
    )


def _native_status() -> str:
    try:
        from ..moe.kernels.native_ffn import native_status
    except ImportError:
        return "not present"
    return native_status()


def markdown(result: dict) -> str:
    """Ratio summary, then one table per (config, dtype, pass) with speed relative to xmoe."""
    meta = result["meta"]
    lines = [
        f"# xmoe bench ({meta['suite']})",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['cpu']} ({meta['cpu_capability']}), "
        f"{meta['threads']} threads, torch {meta['torch']}, commit {meta['git_commit'][:10]}, "
        f"{meta['seconds']:.0f} s.",
        "",
        f"CPU flags: {' '.join(meta.get('cpu_flags', []))}. Native kernel: "
        f"{meta.get('native_kernel', '-')}.",
        "",
        "## Targets (N=4096, d=512, E=64 x 128; decode: N=1 and 8)",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, value in result["ratios"].items():
        op, bound = result["targets"].get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else "-"
        met = result["met"].get(key)
        lines.append(f"| {key} | {value:.3f} | {target} | {'-' if met is None else met} |")
    if result.get("gflops"):
        lines += ["", "## GFLOP/s at the target config (top-2)", ""]
        lines += ["| dtype, pass | " + " | ".join(("dense", XMOE, "xmoe[segment]")) + " |"]
        lines += ["|---|---|---|---|"]
        for key, values in result["gflops"].items():
            cells = " | ".join(
                f"{values[v]:.0f}" if v in values else "-" for v in ("dense", XMOE, "xmoe[segment]")
            )
            lines.append(f"| {key} | {cells} |")
    groups: dict[tuple, list[dict]] = {}
    for r in result["results"]:
        key = (r["config"], r["dtype"], r["pass_"], ",".join(r["tags"]))
        groups.setdefault(key, []).append(r)
    lines += ["", "## Median times", ""]
    for (config, dtype, pass_, tags), rows in groups.items():
        ref = next((r["median_ms"] for r in rows if r["variant"] == XMOE), None)
        ept = rows[0]["experts_per_token"]
        lines += [
            f"**{config}** · {dtype} · {pass_} · {ept:.2f} experts/token · {tags}",
            "",
            "| variant | median ms | xmoe speedup | note |",
            "|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            speed = f"{r['median_ms'] / ref:.2f}x" if ref else "-"
            lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {speed} | {r['note']} |")
        lines.append("")
    if result["memory"]:
        lines += ["## Peak memory, one fp32 fwd+bwd (RSS growth)", ""]
        lines += ["| config | variant | MiB |", "|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['config']} | {m['variant']} | {m['peak_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Time vs experts/token and time vs N (fwd+bwd, fp32). None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tag, xkey, title in (
        (axes[0], "sweep_ept", "experts_per_token", "time vs experts/token (N=4096, 64x128)"),
        (axes[1], "sweep_n", "num_tokens", "time vs tokens (top-2, 64x128)"),
    ):
        rows = [r for r in result["results"] if tag in r["tags"]]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted(
                (r[xkey] if xkey in r else r["spec"][xkey], r["median_ms"])
                for r in rows
                if r["variant"] == variant
            )
            ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set_title(title)
        ax.set_xlabel(xkey.replace("_", " "))
        ax.set_ylabel("fwd+bwd median ms (fp32)")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend()
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    meta = result["meta"]
    fig.suptitle(f"xmoe bench — {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
