"""Peak memory of one forward+backward of one variant (CPU).

There is no allocator counter on CPU, so each measurement runs in a fresh subprocess: one
warm-up step (libraries, thread pools), then freed memory is returned to the OS
(``malloc_trim``), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), and the
figure is how far the peak resident set (``VmHWM``) rose above the resident set during one
forward+backward, gradients included. Linux only; coarse (pages, allocator slack) but real.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
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


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure(payload: dict) -> int | None:
    spec = ProblemSpec(**payload["spec"])
    problem = build_problem(spec, payload["router_scale"])
    variants = build_variants(problem, _DTYPES[payload["dtype"]], names=[payload["variant"]])
    if payload["variant"] not in variants:
        return None
    variant = variants[payload["variant"]]
    grad = torch.randn(spec.num_tokens, spec.d_model)

    def step():
        for p in variant.params:
            p.grad = None
        out = variant.run()
        out.backward(grad.to(out.dtype))

    step()  # warm-up: libraries, thread pools and allocator arenas are not the step's cost
    for p in variant.params:
        p.grad = None
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
