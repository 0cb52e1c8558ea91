"""One benchmark problem: tokens, a routing and one set of expert weights, shared by all variants.

Every variant of :mod:`xmoe.bench.variants` computes the same function on the same problem:
``out[t] = sum_{(t, e) kept} weight * FFN_e(x[t])`` with SwiGLU experts without biases (the
layout of HF's Qwen3-MoE / OLMoE experts, so HF's own implementations can run the same weights).
The router itself is not timed: it is identical for every variant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..moe.experts import Experts
from ..routing import Routing, make_router

# Router specs: "top2", "t0.5" (threshold router at t = 0.5, default init), or "t0.9@1.5"
# (threshold router at t = 0.9 with its logits scaled until the mean is 1.5 experts/token).
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class ProblemSpec:
    num_tokens: int
    d_model: int
    num_experts: int
    d_expert: int
    router: str
    seed: int = 0

    @property
    def key(self) -> str:
        return (
            f"N{self.num_tokens}-d{self.d_model}-E{self.num_experts}x{self.d_expert}-{self.router}"
        )


@dataclass
class Problem:
    spec: ProblemSpec
    x: Tensor  # [N, d] fp32
    routing: Routing  # kept pairs, fp32 weights (detached: the router is not benchmarked)
    experts: Experts  # swiglu, no bias
    topk_idx: Tensor | None  # [N, k] for fixed-k routings (HF's interface), else None
    topk_weight: Tensor | None
    router_scale: float  # the factor applied to the router's logits

    @property
    def experts_per_token(self) -> float:
        return self.routing.experts_per_token


def parse_router(spec: str) -> tuple[str, dict, float | None]:
    """``"top2"`` → ("topk", {k: 2}, None); ``"t0.7"`` → threshold 0.7; ``"t0.9@1.5"`` → target."""
    if spec.startswith("top") and spec[3:].isdigit():
        return "topk", {"k": int(spec[3:])}, None
    if spec.startswith("t"):
        body, _, target = spec[1:].partition("@")
        try:
            threshold = float(body)
            target_ept = float(target) if target else None
        except ValueError:
            target_ept = threshold = None
        if threshold is not None and 0 < threshold <= 1 and (target_ept is None or target_ept >= 1):
            return "threshold", {"threshold": threshold}, target_ept
    raise ValueError(
        f"router spec must look like 'top2', 't0.7' or 't0.9@1.5' (threshold in (0, 1], "
        f"target experts/token >= 1), got {spec!r}"
    )


def build_problem(
    spec: ProblemSpec, router_scale: float | None = None, device: str | torch.device = "cpu"
) -> Problem:
    """Build the problem deterministically from ``spec.seed``.

    For a target experts/token (``"t0.9@1.5"``) the router's logits are scaled by a factor found
    by bisection (larger logits → sharper probabilities → fewer experts); pass ``router_scale``
    to reuse a factor found before. Everything is built on the CPU from the seed (the same
    numbers on every device), then moved to ``device``.
    """
    name, options, target = parse_router(spec.router)
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.num_tokens, spec.d_model, generator=gen)
    torch.manual_seed(spec.seed)
    router = make_router(name, spec.d_model, spec.num_experts, **options).eval()
    experts = Experts(spec.num_experts, spec.d_model, spec.d_expert, "swiglu", bias=False)
    base_weight = router.weight.detach().clone()

    def route(scale: float) -> Routing:
        with torch.no_grad():
            router.weight.copy_(base_weight * scale)
            return router(x)

    if router_scale is None:
        router_scale = 1.0 if target is None else _scale_for_target(route, target)
    routing = route(router_scale)
    routing = dataclasses.replace(routing, weight=routing.weight.detach(), losses={}, extras={})
    topk_idx = topk_weight = None
    if name == "topk":
        k = options["k"]
        order = torch.argsort(routing.token_idx * k + routing.rank, stable=True)
        topk_idx = routing.expert_idx[order].view(-1, k)
        topk_weight = routing.weight[order].view(-1, k)
    problem = Problem(spec, x, routing, experts, topk_idx, topk_weight, router_scale)
    return problem if torch.device(device).type == "cpu" else _to(problem, torch.device(device))


def _to(problem: Problem, device: torch.device) -> Problem:
    r = problem.routing
    moved = {
        f: getattr(r, f).to(device) for f in ("token_idx", "expert_idx", "weight", "rank", "score")
    }
    to = lambda t: None if t is None else t.to(device)
    return dataclasses.replace(
        problem,
        x=problem.x.to(device),
        routing=dataclasses.replace(r, **moved),
        experts=problem.experts.to(device),
        topk_idx=to(problem.topk_idx),
        topk_weight=to(problem.topk_weight),
    )


def _scale_for_target(route, target: float, iters: int = 40) -> float:
    """Bisection on log(scale) for mean experts/token ≈ target (monotone decreasing in scale)."""
    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if route(math.exp(mid)).experts_per_token > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def token_slices(problem: Problem, size: int, count: int) -> list[Problem]:
    """``count`` consecutive ``size``-token slices of ``problem``, each with its own routing.

    The decode benchmark calibrates the router on a large batch (so that a threshold router
    averages 1.5 experts/token the way a trained one does) and then cycles through small slices
    of it: one token alone uses 1, 2 or more experts, and only the cycle averages to the
    calibrated rate.
    """
    if size * count > problem.spec.num_tokens:
        raise ValueError(
            f"{count} slices of {size} tokens need {size * count} tokens, "
            f"the problem has {problem.spec.num_tokens}"
        )
    out = []
    r = problem.routing
    for i in range(count):
        lo, hi = i * size, (i + 1) * size
        keep = (r.token_idx >= lo) & (r.token_idx < hi)
        sub = r.select(keep)
        sub = dataclasses.replace(sub, token_idx=sub.token_idx - lo, num_tokens=size)
        topk_idx = None if problem.topk_idx is None else problem.topk_idx[lo:hi]
        topk_w = None if problem.topk_weight is None else problem.topk_weight[lo:hi]
        spec = dataclasses.replace(problem.spec, num_tokens=size)
        out.append(
            Problem(
                spec, problem.x[lo:hi], sub, problem.experts, topk_idx, topk_w, problem.router_scale
            )
        )
    return out
