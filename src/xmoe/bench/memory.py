"""Peak memory of one forward+backward of one variant (CPU).

There is no allocator counter on CPU, so each measurement runs in a fresh subprocess and
reports how far the process's peak resident set (``ru_maxrss``) rose above its resident set
just before the forward. Allocator caching makes this a coarse figure (about ±1 MiB), but it is
the real footprint of the step.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys

import torch

from .problem import ProblemSpec, build_problem
from .variants import build_variants

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_bytes(spec: ProblemSpec, router_scale: float, variant: str, dtype: str) -> int | None:
    """Peak extra bytes of one forward+backward; None if the variant does not apply."""
    payload = dict(spec=spec.__dict__, router_scale=router_scale, variant=variant, dtype=dtype)
    proc = subprocess.run(
        [sys.executable, "-m", "xmoe.bench.memory", json.dumps(payload)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {variant} failed:\n{proc.stderr[-2000:]}")
    value = json.loads(proc.stdout.strip().splitlines()[-1])
    return None if value is None else int(value)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure(payload: dict) -> int | None:
    spec = ProblemSpec(**payload["spec"])
    problem = build_problem(spec, payload["router_scale"])
    variants = build_variants(problem, _DTYPES[payload["dtype"]], names=[payload["variant"]])
    if payload["variant"] not in variants:
        return None
    variant = variants[payload["variant"]]
    grad = torch.randn(spec.num_tokens, spec.d_model)
    gc.collect()
    before = _rss_bytes()
    out = variant.run()
    out.backward(grad.to(out.dtype))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
