"""Where the time goes: torch.profiler op totals per fwd+bwd of each variant (``--profile``)."""

from __future__ import annotations

import torch

from .problem import ProblemSpec, build_problem
from .variants import build_variants

TARGET_TOP2 = ProblemSpec(4096, 512, 64, 128, "top2")


def profile_target(
    variants=("xmoe", "dense"), reps: int = 3, spec: ProblemSpec = TARGET_TOP2
) -> str:
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
            _fwd_bwd(variant, grad)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(_fwd_bwd(variant, grad) for _ in range(reps)) / reps
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


def _fwd_bwd(variant, grad: torch.Tensor) -> float:
    import time

    for p in variant.params:
        p.grad = None
    start = time.perf_counter()
    variant.run().backward(grad)
    return time.perf_counter() - start
