"""The benchmark suite behind ``xmoe bench``: interleaved timing, ratios, JSON, table, plot.

Method (DESIGN.md): every figure is the median of ``reps`` timed runs after ``warmup`` runs, and
the variants of one configuration are interleaved run by run (the order rotates each repeat), so
a noisy neighbour slows every variant alike and the in-run ratios stay meaningful.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .memory import peak_bytes
from .problem import ProblemSpec, build_problem
from .variants import build_variants

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
# The target: fp32, N = 4096, d = 512, E = 64 experts of width 128.
TARGET = dict(num_tokens=4096, d_model=512, num_experts=64, d_expert=128)
TARGET_TOP2 = ProblemSpec(router="top2", **TARGET)
TARGET_THRESHOLD = ProblemSpec(router="t0.9@1.5", **TARGET)
XMOE = "xmoe[segment]"  # what backend="auto" runs on CPU
# The full suite's grid leaves out the slowest references (hf_eager, xmoe[loop]) to stay
# under ~30 minutes on 2 cores; the target config runs every variant.
GRID_VARIANTS = ("dense", XMOE, "xmoe[grouped_mm]", "capacity", "loop", "hf_grouped_mm")
TARGETS = {  # ratio: (comparison, bound)
    "xmoe_vs_dense": (">=", 0.8),
    "xmoe_vs_loop": (">=", 5.0),
    "xmoe_vs_hf_grouped_mm": (">=", 1.0),
    "threshold_vs_top2": ("<=", 0.8),
}


@dataclass
class Job:
    """Time ``variants`` (None: all) on ``spec`` for each dtype and pass."""

    spec: ProblemSpec
    dtypes: tuple[str, ...] = ("fp32",)
    passes: tuple[str, ...] = PASSES
    variants: tuple[str, ...] | None = None
    reps: int = 5
    warmup: int = 1
    tags: tuple[str, ...] = field(default_factory=tuple)  # "target", "sweep_ept", "sweep_n", ...


def plan(quick: bool) -> tuple[list[Job], list[tuple[ProblemSpec, str]]]:
    """The jobs and the (spec, variant) memory probes of the quick or the full suite."""
    main = ("dense", XMOE, "capacity")
    jobs = [
        Job(TARGET_TOP2, tags=("target",)),
        Job(TARGET_THRESHOLD, tags=("target",)),
        Job(
            TARGET_TOP2,
            dtypes=("bf16",),
            passes=("fwd",) if quick else PASSES,
            variants=("dense", XMOE, "xmoe[grouped_mm]", "hf_grouped_mm"),
            reps=2,
            tags=("bf16",),
        ),
    ]
    epts = (1.0, 1.5, 2.0, 3.0, 4.0) if quick else (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    for ept in epts:
        spec = ProblemSpec(router=f"t0.9@{ept:g}", **TARGET)
        jobs.append(Job(spec, passes=("fwd+bwd",), variants=main, reps=3, tags=("sweep_ept",)))
    sizes = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    for n in sizes:
        spec = ProblemSpec(**{**TARGET, "num_tokens": n, "router": "top2"})
        variants = ("dense", XMOE, "loop")
        jobs.append(Job(spec, passes=("fwd+bwd",), variants=variants, reps=3, tags=("sweep_n",)))
    if not quick:
        for n in (1024, 4096, 16384):
            for e, h in ((8, 512), (64, 64), (64, 128)):
                for router in ("top2", "t0.5", "t0.7", "t0.9"):
                    spec = ProblemSpec(n, 512, e, h, router)
                    if spec not in (TARGET_TOP2,):
                        jobs.append(Job(spec, variants=GRID_VARIANTS, reps=2, tags=("grid",)))
    mem_variants = ("dense", XMOE, "loop", "capacity", "hf_grouped_mm")
    memory = [(s, v) for s in (TARGET_TOP2, TARGET_THRESHOLD) for v in mem_variants]
    mem_epts = (1.0, 2.0, 4.0) if quick else (1.0, 2.0, 4.0, 8.0)
    memory += [(ProblemSpec(router=f"t0.9@{e:g}", **TARGET), XMOE) for e in mem_epts]
    return jobs, memory


def time_job(job: Job, problem, progress=None) -> list[dict]:
    """Interleaved medians for one job: one row per (variant, dtype, pass)."""
    rows = []
    grad = torch.randn(job.spec.num_tokens, job.spec.d_model, generator=torch.Generator())
    for dtype in job.dtypes:
        variants = build_variants(problem, DTYPES[dtype], list(job.variants or []) or None)
        for pass_ in job.passes:
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for rep in range(job.warmup + job.reps):
                shift = rep % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds = _time_once(variants[name], pass_, grad)
                    if rep >= job.warmup:
                        times[name].append(seconds)
                    if progress is not None:
                        progress.update(1)
            for name, ts in times.items():
                rows.append(
                    dict(
                        variant=name,
                        config=job.spec.key,
                        spec=job.spec.__dict__,
                        experts_per_token=problem.experts_per_token,
                        dtype=dtype,
                        pass_=pass_,
                        median_ms=statistics.median(ts) * 1e3,
                        times_ms=[t * 1e3 for t in ts],
                        note=variants[name].note,
                        tags=list(job.tags),
                    )
                )
    return rows


def _time_once(variant, pass_: str, grad: torch.Tensor) -> float:
    for p in variant.params:
        p.grad = None
    if pass_ == "fwd":
        with torch.no_grad():
            start = time.perf_counter()
            variant.run()
            return time.perf_counter() - start
    start = time.perf_counter()
    out = variant.run()
    out.backward(grad.to(out.dtype))
    return time.perf_counter() - start


def _n_runs(job: Job) -> int:
    n_variants = len(job.variants) if job.variants else 9
    return len(job.dtypes) * len(job.passes) * (job.warmup + job.reps) * n_variants


def run_suite(
    quick: bool,
    out_dir: Path,
    progress: bool = True,
    command: str = "",
    *,
    jobs: list[Job] | None = None,
    memory_probes: list[tuple[ProblemSpec, str]] | None = None,
    target: tuple[ProblemSpec, ProblemSpec] = (TARGET_TOP2, TARGET_THRESHOLD),
) -> dict:
    """Run the suite, write ``bench-<quick|full>-<stamp>.json`` (+ ``.md``, ``.png``).

    ``jobs``, ``memory_probes`` and ``target`` (the top-2 and threshold specs the headline ratios
    compare) default to the quick or full plan; tests pass tiny ones.
    """
    if jobs is None:
        jobs, planned_memory = plan(quick)
        memory_probes = planned_memory if memory_probes is None else memory_probes
    memory_probes = memory_probes or []
    started = time.time()
    rows: list[dict] = []
    scales: dict[ProblemSpec, float] = {}
    bar = tqdm(total=sum(map(_n_runs, jobs)), desc="bench", unit="run", disable=not progress)
    for job in jobs:
        problem = build_problem(job.spec, scales.get(job.spec))
        scales[job.spec] = problem.router_scale
        bar.set_postfix_str(job.spec.key)
        rows += time_job(job, problem, bar)
    bar.close()
    memory = []
    for spec, variant in tqdm(memory_probes, desc="memory", disable=not progress):
        if spec not in scales:
            scales[spec] = build_problem(spec).router_scale
        peak = peak_bytes(spec, scales[spec], variant, "fp32")
        if peak is not None:
            memory.append(
                dict(config=spec.key, spec=spec.__dict__, variant=variant, peak_mib=peak / 2**20)
            )
    result = dict(
        meta=_meta(quick, command, time.time() - started),
        ratios=target_ratios(rows, *target),
        targets=TARGETS,
        results=rows,
        memory=memory,
    )
    result["met"] = {k: _meets(result["ratios"].get(k), *TARGETS[k]) for k in TARGETS}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{'quick' if quick else 'full'}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    _write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1))
    _write_atomic(stem.with_suffix(".md"), markdown(result))
    png = plot(result, stem.with_suffix(".png"))
    result["files"] = [str(stem.with_suffix(s)) for s in (".json", ".md")] + (
        [str(png)] if png else []
    )
    return result


def _meets(value, op: str, bound: float) -> bool | None:
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
    rows: list[dict], top2: ProblemSpec = TARGET_TOP2, threshold: ProblemSpec = TARGET_THRESHOLD
) -> dict:
    """The issue's ratios for the target config (fp32, fwd+bwd). Speed ratios: >1 = xmoe faster."""
    xmoe = _median(rows, XMOE, top2)
    out = {}
    for key, ref in (("dense", "dense"), ("loop", "loop"), ("hf_grouped_mm", "hf_grouped_mm")):
        t = _median(rows, ref, top2)
        if xmoe and t:
            out[f"xmoe_vs_{key}"] = t / xmoe
    thr = _median(rows, XMOE, threshold)
    if xmoe and thr:
        out["threshold_vs_top2"] = thr / xmoe  # a time ratio: < 1 = the threshold layer is cheaper
    cap_top2 = _median(rows, "capacity", top2)
    cap_thr = _median(rows, "capacity", threshold)
    if cap_top2 and cap_thr:
        out["capacity_threshold_vs_top2"] = cap_thr / cap_top2
    for dtype in ("bf16",):
        for pass_ in PASSES:
            x, d = (_median(rows, v, top2, dtype, pass_) for v in (XMOE, "dense"))
            if x and d:
                out[f"{dtype}_{pass_}_xmoe_vs_dense"] = d / x
            x32 = _median(rows, XMOE, top2, "fp32", pass_)
            if x and x32:
                out[f"{dtype}_{pass_}_xmoe_speed_vs_fp32"] = x32 / x
    return out


def _meta(quick: bool, command: str, seconds: float) -> dict:
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
        device="cpu",
        cpu=cpu,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        git_commit=commit,
        seconds=round(seconds, 1),
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
        "## Target config (fp32, fwd+bwd, N=4096, d=512, E=64 x 128)",
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, value in result["ratios"].items():
        op, bound = result["targets"].get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else "-"
        met = result["met"].get(key)
        lines.append(f"| {key} | {value:.3f} | {target} | {'-' if met is None else met} |")
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


def profile_target(variants=(XMOE, "dense"), reps: int = 3, spec: ProblemSpec = TARGET_TOP2) -> str:
    """Where the time goes: torch.profiler op totals per fwd+bwd of each variant (markdown).

    Ops are grouped into GEMM (mm/addmm/bmm/grouped_mm), gather/scatter (index_select,
    index_add/scatter_add, index_copy), elementwise (everything else inside ATen) and Python /
    dispatch overhead (wall time not inside any ATen op).
    """
    from torch.profiler import ProfilerActivity, profile

    groups = {
        "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm"),
        "gather/scatter": (
            "aten::index_select",
            "aten::index_add_",
            "aten::index_add",
            "aten::scatter_add_",
            "aten::index_copy",
            "aten::index",
            "aten::index_put_",
        ),
        "sort/bincount": ("aten::sort", "aten::argsort", "aten::bincount", "aten::cumsum"),
    }
    problem = build_problem(spec)
    grad = torch.randn(spec.num_tokens, spec.d_model)
    built = build_variants(problem, torch.float32, list(variants))
    lines = [
        f"### Profile: {spec.key}, fp32 fwd+bwd, {torch.get_num_threads()} threads, "
        f"mean of {reps} runs",
        "",
        "| variant | wall ms | " + " | ".join(groups) + " | other ATen | outside ATen |",
        "|---|---|" + "---|" * (len(groups) + 2),
    ]
    for name, variant in built.items():
        for _ in range(2):
            _time_once(variant, "fwd+bwd", grad)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(_time_once(variant, "fwd+bwd", grad) for _ in range(reps)) / reps
        totals = dict.fromkeys(groups, 0.0)
        aten = 0.0
        for ev in prof.key_averages():
            if not ev.key.startswith("aten::"):
                continue
            aten += ev.self_cpu_time_total
            for group, ops in groups.items():
                if ev.key in ops:
                    totals[group] += ev.self_cpu_time_total
        ms = {k: v / 1e3 / reps for k, v in totals.items()}
        other = aten / 1e3 / reps - sum(ms.values())
        outside = wall * 1e3 - aten / 1e3 / reps
        cells = " | ".join(f"{v:.1f}" for v in ms.values())
        lines.append(f"| {name} | {wall * 1e3:.1f} | {cells} | {other:.1f} | {outside:.1f} |")
    return "\n".join(lines) + "\n"
