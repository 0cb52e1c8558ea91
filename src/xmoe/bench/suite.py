"""The benchmark suite behind ``xmoe bench``: the plan, interleaved timing, the result file.

Method (DESIGN.md): every figure is the median of ``reps`` timed runs after ``warmup`` runs, and
the variants of one configuration are interleaved run by run (the order rotates each repeat), so
a noisy neighbour slows every variant alike and the in-run ratios stay meaningful. Ratios, the
markdown and the plot are in :mod:`xmoe.bench.report`.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .._io import atomic_write
from .memory import peak_bytes
from .problem import ProblemSpec, build_problem, token_slices
from .profile import profile_target
from .report import TARGETS, XMOE, environment, markdown, meets, plot, target_ratios
from .variants import build_variants

__all__ = ["TARGETS", "XMOE", "Job", "plan", "profile_target", "run_suite", "time_job"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
# The target: N = 4096, d = 512, E = 64 experts of width 128.
TARGET = dict(num_tokens=4096, d_model=512, num_experts=64, d_expert=128)
TARGET_TOP2 = ProblemSpec(router="top2", **TARGET)
TARGET_THRESHOLD = ProblemSpec(router="t0.9@1.5", **TARGET)
# Decode: forward only at small N, routed as a large batch is (1.5 experts/token on average).
DECODE_SIZES = (1, 8, 64, 512)
DECODE_TOKENS = 4096  # the batch the decode slices are cut from
DECODE_CYCLE = 256  # at most this many slices per repeat
DECODE_VARIANTS = ("dense", XMOE, "xmoe[segment]", "hf_grouped_mm")
# The full suite's grid leaves out the slowest references (hf_eager, xmoe[loop]) to stay
# under ~30 minutes on 2 cores; the target config runs every variant.
GRID_VARIANTS = ("dense", XMOE, "xmoe[grouped_mm]", "capacity", "loop", "hf_grouped_mm")


@dataclass
class Job:
    """Time ``variants`` (None: all) on ``spec`` for each dtype and pass.

    ``cycle > 0`` makes a decode job: the problem is built at ``DECODE_TOKENS`` tokens (or
    ``calibrate_tokens``) and every repeat runs each variant once on each of ``cycle``
    consecutive ``spec.num_tokens``-token slices of it; the figure is the mean per call.
    """

    spec: ProblemSpec
    dtypes: tuple[str, ...] = ("fp32",)
    passes: tuple[str, ...] = PASSES
    variants: tuple[str, ...] | None = None
    reps: int = 5
    warmup: int = 1
    tags: tuple[str, ...] = field(default_factory=tuple)  # "target", "sweep_ept", "decode", ...
    cycle: int = 0
    calibrate_tokens: int = DECODE_TOKENS

    def problem_spec(self) -> ProblemSpec:
        """The spec the problem is built (and the router calibrated) on."""
        if not self.cycle:
            return self.spec
        n = max(self.calibrate_tokens, self.spec.num_tokens * self.cycle)
        return ProblemSpec(**{**self.spec.__dict__, "num_tokens": n})


def plan(quick: bool) -> tuple[list[Job], list[tuple[ProblemSpec, str]]]:
    """The jobs and the (spec, variant) memory probes of the quick or the full suite."""
    main = ("dense", XMOE, "capacity")
    bf16 = ("dense", XMOE, "xmoe[segment]", "xmoe[grouped_mm]", "hf_grouped_mm")
    jobs = [
        Job(TARGET_TOP2, tags=("target",)),
        Job(TARGET_THRESHOLD, variants=(*main, "xmoe[segment]"), tags=("target",)),
        Job(TARGET_TOP2, dtypes=("bf16",), variants=bf16, reps=3, tags=("target", "bf16")),
        Job(
            TARGET_THRESHOLD,
            dtypes=("bf16",),
            variants=("dense", XMOE),
            reps=3,
            tags=("target", "bf16"),
        ),
    ]
    for n in DECODE_SIZES:
        for router in ("top2", "t0.9@1.5"):
            spec = ProblemSpec(**{**TARGET, "num_tokens": n, "router": router})
            # Enough slices that their mean rate is the calibrated one: the per-token number
            # of experts is skewed (most tokens take 1, a few many), so 16 single tokens
            # average well under 1.5.
            cycle = max(1, min(DECODE_CYCLE, DECODE_TOKENS // n))
            jobs.append(
                Job(
                    spec,
                    dtypes=("fp32", "bf16"),
                    passes=("fwd",),
                    variants=DECODE_VARIANTS,
                    reps=5,
                    tags=("decode",),
                    cycle=cycle,
                )
            )
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
    slices = token_slices(problem, job.spec.num_tokens, job.cycle) if job.cycle else [None]
    ept = (
        sum(s.routing.num_pairs for s in slices) / (job.spec.num_tokens * job.cycle)
        if job.cycle
        else problem.experts_per_token
    )
    grad = torch.randn(job.spec.num_tokens, job.spec.d_model, generator=torch.Generator())
    grad = grad.to(problem.x.device)
    for dtype in job.dtypes:
        variants = build_variants(problem, DTYPES[dtype], list(job.variants or []) or None)
        inputs = next(iter(variants.values())).inputs if variants else None
        for pass_ in job.passes:
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for rep in range(job.warmup + job.reps):
                shift = rep % len(names)
                order = names[shift:] + names[:shift]
                total = dict.fromkeys(names, 0.0)
                for piece in slices:
                    if piece is not None:
                        inputs.use(piece, DTYPES[dtype])
                    for name in order:
                        total[name] += _time_once(variants[name], pass_, grad)
                for name in names:
                    if rep >= job.warmup:
                        times[name].append(total[name] / len(slices))
                    if progress is not None:
                        progress.update(1)
            for name, ts in times.items():
                rows.append(
                    dict(
                        variant=name,
                        config=job.spec.key,
                        spec=job.spec.__dict__,
                        experts_per_token=ept,
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
    for p in (variant.inputs.x, *variant.params[1:]):
        p.grad = None
    sync = torch.cuda.synchronize if grad.is_cuda else (lambda: None)
    sync()
    if pass_ == "fwd":
        with torch.inference_mode():
            start = time.perf_counter()
            variant.run()
            sync()
            return time.perf_counter() - start
    start = time.perf_counter()
    out = variant.run()
    out.backward(grad.to(out.dtype))
    sync()
    return time.perf_counter() - start


def _n_runs(job: Job) -> int:
    n_variants = len(job.variants) if job.variants else 10
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
    device: str = "cpu",
) -> dict:
    """Run the suite, write ``bench-<quick|full>-<stamp>.json`` (+ ``.md``, ``.png``).

    ``jobs``, ``memory_probes`` and ``target`` (the top-2 and threshold specs the headline ratios
    compare) default to the quick or full plan; tests pass tiny ones. ``device="cuda"`` runs
    the same plan on the GPU (memory probes are CPU-only and are skipped there).
    """
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if jobs is None:
        jobs, planned_memory = plan(quick)
        memory_probes = planned_memory if memory_probes is None else memory_probes
    memory_probes = (memory_probes or []) if device == "cpu" else []
    started = time.time()
    rows: list[dict] = []
    scales: dict[ProblemSpec, float] = {}
    bar = tqdm(total=sum(map(_n_runs, jobs)), desc="bench", unit="run", disable=not progress)
    for job in jobs:
        spec = job.problem_spec()
        problem = build_problem(spec, scales.get(spec), device)
        scales[spec] = problem.router_scale
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
    ratios, gflops = target_ratios(rows, *target)
    meta = environment(quick, command, time.time() - started, device)
    result = dict(
        meta=meta, ratios=ratios, gflops=gflops, targets=TARGETS, results=rows, memory=memory
    )
    result["met"] = {k: meets(ratios.get(k), *TARGETS[k]) for k in TARGETS}
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench-{'quick' if quick else 'full'}{'' if device == 'cpu' else '-' + device}"
    stem = out_dir / f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    atomic_write(stem.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write(stem.with_suffix(".md"), markdown(result))
    png = plot(result, stem.with_suffix(".png"))
    result["files"] = [str(stem.with_suffix(s)) for s in (".json", ".md")] + (
        [str(png)] if png else []
    )
    return result
