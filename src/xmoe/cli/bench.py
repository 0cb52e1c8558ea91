"""``xmoe bench``: the benchmark suite (BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write
from .options import command_line


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmark xmoe's dispatch against dense, loop, capacity and HF experts",
        description="Interleaved medians of every variant on the same routing and weights; "
        "writes JSON, a markdown table and a PNG plot. See BENCHMARKS.md.",
    )
    b.add_argument("--quick", action="store_true", help="the short suite (a few minutes)")
    b.add_argument(
        "--out", default="benchmarks/results", help="output directory (default: %(default)s)"
    )
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    b.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where to run the suite (cuda: `make gpu-check`; default: %(default)s)",
    )
    b.add_argument(
        "--comm",
        action="store_true",
        help="also measure expert-parallel all-to-all volume/time (2 gloo processes)",
    )
    b.add_argument(
        "--profile",
        action="store_true",
        help="only profile where the time goes (GEMM, gather/scatter, ...) at the target config",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(handler=bench_command)


def bench_command(args) -> int:
    import torch

    from ..bench.suite import run_suite

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.profile:
        from ..bench.suite import profile_target

        print(profile_target())
        return 0
    result = run_suite(
        args.quick, Path(args.out), not args.no_progress, command_line(args), device=args.device
    )
    print(ratio_table(result))
    if args.comm:
        from ..bench.comm import format_table, run_comm_bench

        rows = run_comm_bench()
        print(format_table(rows))
        comm_path = Path(result["files"][0]).with_suffix(".comm.json")
        atomic_write(comm_path, json.dumps(rows, indent=1))
        result["files"].append(str(comm_path))
    print("files: " + ", ".join(result["files"]))
    return 0


def ratio_table(result: dict) -> str:
    lines = ["ratio (N=4096 d=512 E=64x128; decode N=1, 8)             value   target   met"]
    for key, value in result["ratios"].items():
        op, bound = result["targets"].get(key, ("", None))
        target = f"{op} {bound:g}" if bound is not None else ""
        met = result["met"].get(key)
        lines.append(f"  {key:<36} {value:8.3f}   {target:<7}  {'' if met is None else met}")
    return "\n".join(lines)
