"""The implementations compared by ``xmoe bench``, all on one :class:`~xmoe.bench.problem.Problem`.

Each builder returns a :class:`Variant` whose ``run()`` computes ``[N, d]`` from the problem's
tokens, routing and expert weights (fresh leaf copies, so variants never share gradients), or
``None`` when the variant does not apply (e.g. HF's interface needs a fixed k).

- ``dense``: one SwiGLU FFN whose width is the mean active expert width per token (equal FLOPs).
- ``loop``: per-expert Python loop of mask → gather → FFN on ``w[e]`` → weighted ``index_add``,
  the pattern of HF's eager experts (on xmoe's pair list, so it also runs variable k).
- ``capacity``: GShard / original-XMoE style: every expert computes a full ``[C, d]`` buffer,
  ``C = ceil(cf * N / E)``, used or not.
- ``xmoe[<backend>]``: xmoe's dispatch (sort → permute → experts → unpermute) per backend.
- ``hf_<impl>``: transformers' own Qwen3-MoE experts with ``experts_implementation`` =
  ``grouped_mm`` / ``batched_mm`` / ``eager``, when transformers is installed and k is fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe.dispatch import permute, plan_dispatch, unpermute
from ..moe.experts import Experts
from ..routing import Routing
from .problem import Problem

# "" is backend="auto" (the variant "xmoe": what a user gets), the others are forced.
XMOE_BACKENDS = ("", "native", "segment", "grouped_mm", "loop")
HF_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
# hf_batched_mm is skipped above this much gathered weight (the target config would need 6 GiB).
BATCHED_MM_MAX_BYTES = 1 << 30


@dataclass
class Inputs:
    """What a variant reads at each call: tokens and their routing. Shared by all the variants
    of one :func:`build_variants` call; the decode benchmark swaps them between calls to cycle
    through different tokens with the same weights."""

    x: Tensor  # [N, d] in the variant dtype (a leaf that requires grad)
    routing: Routing
    topk_idx: Tensor | None
    topk_weight: Tensor | None

    def use(self, problem: Problem, dtype: torch.dtype) -> None:
        """Point at ``problem``'s tokens and routing (same shapes of weights)."""
        self.x = _leaf(problem.x, dtype)
        self.routing, self.topk_idx = problem.routing, problem.topk_idx
        self.topk_weight = problem.topk_weight


@dataclass
class Variant:
    name: str
    run: Callable[[], Tensor]
    params: list[Tensor] = field(default_factory=list)  # leaves to clear between runs
    note: str = ""
    inputs: Inputs | None = None


def _leaf(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype).clone().requires_grad_(True)


def build_variants(
    problem: Problem,
    dtype: torch.dtype,
    names: list[str] | None = None,
    capacity_factor: float | None = None,
) -> dict[str, Variant]:
    """All applicable variants (or those in ``names``) in ``dtype`` for ``problem``."""
    inp = Inputs(_leaf(problem.x, dtype), problem.routing, problem.topk_idx, problem.topk_weight)
    ex = problem.experts
    w1, w2, w3 = (_leaf(getattr(ex, n), dtype) for n in ("w1", "w2", "w3"))
    builders = {
        "dense": lambda: _dense(problem, inp, dtype),
        "loop": lambda: _loop(problem, inp, w1, w2, w3),
        "capacity": lambda: _capacity(problem, inp, w1, w2, w3, capacity_factor),
        **{
            f"xmoe[{b}]" if b else "xmoe": (lambda b=b: _xmoe(problem, inp, ex, dtype, b))
            for b in XMOE_BACKENDS
        },
        **{
            f"hf_{impl}": (lambda impl=impl: _hf(problem, inp, w1, w2, w3, impl))
            for impl in HF_IMPLEMENTATIONS
        },
    }
    out = {}
    for name, build in builders.items():
        if names is not None and name not in names:
            continue
        v = build()
        if v is not None:
            v.params, v.inputs = [inp.x, *v.params], inp
            out[name] = v
    return out


def _dense(problem: Problem, inp: Inputs, dtype: torch.dtype) -> Variant:
    spec = problem.spec
    width = max(1, round(problem.experts_per_token * spec.d_expert))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    device = problem.x.device
    init = lambda *shape: (torch.randn(*shape, generator=gen) / math.sqrt(shape[0])).to(
        device, dtype
    )
    d1, d3, d2 = (
        init(spec.d_model, width).requires_grad_(True),
        init(spec.d_model, width).requires_grad_(True),
        init(width, spec.d_model).requires_grad_(True),
    )
    run = lambda: (F.silu(inp.x @ d1) * (inp.x @ d3)) @ d2
    return Variant("dense", run, [d1, d2, d3], note=f"width {width}")


def _swiglu(a: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    return (F.silu(a @ w1) * (a @ w3)) @ w2


def _loop(problem: Problem, inp: Inputs, w1, w2, w3) -> Variant:
    E = problem.spec.num_experts

    def run():
        x, r = inp.x, inp.routing
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(E):
            (pos,) = torch.where(r.expert_idx == e)
            if pos.numel() == 0:
                continue
            tok = r.token_idx[pos]
            y = _swiglu(x[tok], w1[e], w3[e], w2[e])
            out.index_add_(0, tok, y.float() * r.weight[pos, None])
        return out

    return Variant("loop", run, [w1, w2, w3])


def _capacity(problem: Problem, inp: Inputs, w1, w2, w3, capacity_factor: float | None) -> Variant:
    r = problem.routing  # the slots are precomputed: no decode cycling for this variant
    spec = problem.spec
    E, N = spec.num_experts, spec.num_tokens
    cf = capacity_factor or (2.0 if problem.topk_idx is not None else 8.0)
    C = math.ceil(cf * N / E)
    # Position of each pair in its expert's buffer (priority by rank then token, as GShard).
    order = torch.argsort(r.rank * N + r.token_idx, stable=True)
    order = order[torch.argsort(r.expert_idx[order], stable=True)]
    counts = torch.bincount(r.expert_idx, minlength=E)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device) - starts[r.expert_idx[order]]
    keep = pos < C
    slot = (r.expert_idx * C + pos)[keep]
    tok, weight = r.token_idx[keep], r.weight[keep]

    def run():
        x = inp.x
        buf = x.new_zeros(E * C, x.shape[1]).index_copy(0, slot, x.index_select(0, tok))
        buf = buf.view(E, C, -1)
        y = torch.bmm(F.silu(torch.bmm(buf, w1)) * torch.bmm(buf, w3), w2).view(E * C, -1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add(0, tok, y.index_select(0, slot).float() * weight[:, None])

    dropped = 1 - keep.float().mean().item()
    return Variant("capacity", run, [w1, w2, w3], note=f"cf {cf:g}, C {C}, dropped {dropped:.1%}")


def _xmoe(problem: Problem, inp: Inputs, experts: Experts, dtype: torch.dtype, backend: str):
    if backend and not _available(backend, dtype, experts.d_model, experts.d_expert):
        return None
    ex = Experts(
        experts.num_experts, experts.d_model, experts.d_expert, "swiglu", False, backend or "auto"
    )
    with torch.no_grad():
        for n in ("w1", "w2", "w3"):
            getattr(ex, n).copy_(getattr(experts, n))
    ex = ex.to(dtype)

    def run():
        plan = plan_dispatch(inp.routing)
        y = ex(permute(inp.x, plan), plan.counts, plan.expert_idx, plan.weight)
        return unpermute(y, plan, weighted=True)

    name = f"xmoe[{backend}]" if backend else "xmoe"
    note = "" if backend else f"auto: {ex.resolve_backend(dtype, inp.x.device)}"
    return Variant(name, run, list(ex.parameters()), note=note)


def _available(backend: str, dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    from ..moe.experts import BACKENDS, backend_available

    return backend in BACKENDS and backend_available(backend, dtype, d_model, d_expert)


def _hf(problem: Problem, inp: Inputs, w1, w2, w3, impl: str):
    if problem.topk_idx is None:
        return None  # HF's experts take a fixed-k [N, k] routing
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    spec = problem.spec
    if impl == "batched_mm":
        # batched_mm gathers a weight copy per pair: S * 3 * d * h elements.
        size = inp.x.element_size()
        gathered = problem.routing.num_pairs * 3 * spec.d_model * spec.d_expert * size
        if gathered > BATCHED_MM_MAX_BYTES:
            return None
    cfg = Qwen3MoeConfig(
        hidden_size=spec.d_model,
        moe_intermediate_size=spec.d_expert,
        num_experts=spec.num_experts,
        num_experts_per_tok=problem.topk_idx.shape[1],
        hidden_act="silu",
    )
    cfg._experts_implementation = impl
    hf = Qwen3MoeExperts(cfg)
    # HF layout: gate_up_proj [E, 2h, d] (gate rows first), down_proj [E, d, h].
    hf.gate_up_proj = nn.Parameter(torch.cat([w1.detach().mT, w3.detach().mT], 1).contiguous())
    hf.down_proj = nn.Parameter(w2.detach().mT.contiguous())

    def run():
        return hf(inp.x, inp.topk_idx, inp.topk_weight.to(inp.x.dtype))

    return Variant(f"hf_{impl}", run, list(hf.parameters()))
