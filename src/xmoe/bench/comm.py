"""Expert-parallel communication: bytes sent and all-to-all time, top-2 vs threshold routing.

``run_comm_bench()`` spawns ``world_size`` gloo processes (CPU). Every rank builds the same MoE
layer and the same global batch from a seed, keeps its shard of the tokens and its slice of
the experts (:class:`~xmoe.distributed.ExpertParallelMoE`), and for each router:

- counts the rows that leave the rank: dispatch (token rows to the experts' owners) plus
  combine (expert outputs back), forward and backward (the backward exchanges mirror them);
- times the two forward row all-to-alls (dispatch + combine) alone, and one full layer
  forward + backward, interleaving the routers run by run; medians after warm-up.

Rows a rank keeps for its own experts are not counted as sent. The router specs are those of
``xmoe bench``: ``top2``, ``t0.9`` (threshold router at its default init) and ``t0.9@1.5``
(threshold router with its logits scaled until the global mean is 1.5 experts/token, the
regime of a trained threshold router).

``xmoe bench --comm`` runs it after the suite, prints the table and saves the rows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .._io import markdown_table

ROUTERS = ("top2", "t0.9", "t0.9@1.5")


def run_comm_bench(
    num_tokens: int = 2048,
    d_model: int = 512,
    num_experts: int = 64,
    d_expert: int = 128,
    routers: tuple[str, ...] = ROUTERS,
    world_size: int = 2,
    reps: int = 7,
    warmup: int = 2,
    seed: int = 0,
) -> list[dict]:
    """One row per router: experts/token, rows and bytes sent per rank per training step,
    all-to-all and layer times. ``num_tokens`` is per rank (fp32 rows of ``d_model``)."""
    import torch.multiprocessing as mp

    from .problem import parse_router

    for spec in routers:
        parse_router(spec)  # validate before spawning
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by world_size={world_size}")
    args = dict(
        num_tokens=num_tokens,
        d_model=d_model,
        num_experts=num_experts,
        d_expert=d_expert,
        routers=list(routers),
        reps=reps,
        warmup=warmup,
        seed=seed,
    )
    from ..distributed.groups import free_local_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        mp.start_processes(
            _worker,
            args=(world_size, free_local_port(), args, str(out)),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return json.loads(out.read_text())


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from ..distributed.groups import init_local_gloo

    init_local_gloo(rank, world, port)
    try:
        rows = measure_in_group(rank, world, **args)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure_in_group(
    rank: int,
    world: int,
    num_tokens: int,
    d_model: int,
    num_experts: int,
    d_expert: int,
    routers: list[str],
    reps: int,
    warmup: int,
    seed: int,
) -> list[dict]:
    """The measurement itself, on every rank of an initialised default group of ``world``
    ranks (what each spawned process of :func:`run_comm_bench` runs). Rows on every rank."""
    import torch.distributed as dist

    from ..distributed import ExpertParallelMoE, all_to_all, exchange_counts
    from ..moe.dispatch import permute, plan_dispatch
    from ..moe.layer import MoE
    from .problem import parse_router

    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(world * num_tokens, d_model, generator=gen)
    x = x_all[rank * num_tokens : (rank + 1) * num_tokens]
    layers, stats = {}, {}
    for spec in routers:
        name, options, target = parse_router(spec)
        torch.manual_seed(seed)  # the same layer on every rank
        moe = MoE(d_model, num_experts, d_expert, router=name, activation="swiglu", **options)
        if target is not None:  # same scale on every rank: computed on the global batch
            _scale_router(moe, x_all, target)
        layer = ExpertParallelMoE.from_moe(moe)
        with torch.no_grad():
            routing = layer.router(x)
        plan = plan_dispatch(routing)
        recv = exchange_counts(plan.counts, layer.group)
        p, local = world, num_experts // world
        send_rows = plan.counts.view(p, local).sum(1)
        recv_rows = recv.sum(1)
        off_rank = int(send_rows.sum() - send_rows[rank]) + int(recv_rows.sum() - recv_rows[rank])
        pairs = torch.tensor([routing.num_pairs, routing.num_tokens, off_rank], dtype=torch.float64)
        dist.all_reduce(pairs)
        layers[spec] = (layer, plan, send_rows.tolist(), recv_rows.tolist())
        row_bytes = d_model * x.element_size()
        stats[spec] = {
            "router": spec,
            "experts_per_token": pairs[0].item() / pairs[1].item(),
            # dispatch + combine rows leaving a rank, mean over ranks, forward only
            "rows_sent_fwd": pairs[2].item() / world,
            # forward + backward (the backward exchanges move the same rows the other way)
            "bytes_sent_per_step": 2 * pairs[2].item() / world * row_bytes,
        }
    a2a_ms: dict[str, list[float]] = {s: [] for s in routers}
    step_ms: dict[str, list[float]] = {s: [] for s in routers}
    for rep in range(warmup + reps):
        order = routers[rep % len(routers) :] + routers[: rep % len(routers)]
        for spec in order:
            layer, plan, send, recv = layers[spec]
            rows = permute(x, plan)
            dist.barrier()
            t0 = time.perf_counter()
            received = all_to_all(rows, recv, send, layer.group)
            all_to_all(received, send, recv, layer.group)  # combine moves the same row counts
            t1 = time.perf_counter()
            xg = x.clone().requires_grad_()
            dist.barrier()
            t2 = time.perf_counter()
            y, _ = layer.forward_with_routing(xg)
            y.sum().backward()
            t3 = time.perf_counter()
            if rep >= warmup:
                a2a_ms[spec].append(_max_over_ranks(t1 - t0) * 1e3)
                step_ms[spec].append(_max_over_ranks(t3 - t2) * 1e3)
    env = {
        "world_size": world,
        "backend": dist.get_backend(),
        "tokens_per_rank": num_tokens,
        "d_model": d_model,
        "num_experts": num_experts,
        "d_expert": d_expert,
        "dtype": "fp32",
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "reps": reps,
    }
    return [
        {
            **stats[s],
            "a2a_fwd_ms": statistics.median(a2a_ms[s]),
            "layer_fwd_bwd_ms": statistics.median(step_ms[s]),
            **env,
        }
        for s in routers
    ]


def _max_over_ranks(seconds: float) -> float:
    """A collective step lasts as long as its slowest rank."""
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _scale_router(moe, x_all: torch.Tensor, target: float, iters: int = 30) -> None:
    """Scale the router weight until the mean experts/token on ``x_all`` is about ``target``
    (bisection on log(scale); larger logits → sharper probabilities → fewer experts)."""
    base = moe.router.weight.detach().clone()
    lo, hi = math.log(1e-3), math.log(1e3)
    with torch.no_grad():
        for _ in range(iters):
            mid = (lo + hi) / 2
            moe.router.weight.copy_(base * math.exp(mid))
            if moe.router(x_all).experts_per_token > target:
                lo = mid
            else:
                hi = mid
        moe.router.weight.copy_(base * math.exp((lo + hi) / 2))


def format_table(rows: list[dict]) -> str:
    """Markdown table, with each router's bytes and time relative to the first row."""
    if not rows:
        return ""
    ref = rows[0]
    rel = [
        {
            **r,
            "mb": r["bytes_sent_per_step"] / 1e6,
            "bytes_rel": r["bytes_sent_per_step"] / ref["bytes_sent_per_step"],
            "a2a_rel": r["a2a_fwd_ms"] / ref["a2a_fwd_ms"],
        }
        for r in rows
    ]
    columns = [
        ("router", "router", "{}"),
        ("experts_per_token", "experts/token", "{:.2f}"),
        ("rows_sent_fwd", "rows sent / rank (fwd)", "{:.0f}"),
        ("mb", "MB sent / rank / step (fwd+bwd)", "{:.2f}"),
        ("bytes_rel", f"vs {ref['router']}", "{:.2f}"),
        ("a2a_fwd_ms", "all-to-all fwd ms", "{:.2f}"),
        ("a2a_rel", f"vs {ref['router']}", "{:.2f}"),
        ("layer_fwd_bwd_ms", "layer fwd+bwd ms", "{:.1f}"),
    ]
    e = rows[0]
    return markdown_table(rel, columns) + (
        f"\n{e['world_size']} {e['backend']} ranks, {e['tokens_per_rank']} tokens/rank, "
        f"d_model {e['d_model']}, {e['num_experts']} experts x {e['d_expert']} (swiglu), "
        f"{e['dtype']}, {e['threads_per_rank']} thread/rank, torch {e['torch']}, "
        f"median of {e['reps']}"
    )
