"""The converted FFN: a dense FFN's neurons sliced into E experts, run sparsely by a threshold rule.

A dense FFN ``y = act(x W1ᵀ + b1) W2ᵀ + b2`` (or, gated, ``(act(x Wgᵀ + bg) * (x Wuᵀ + bu)) W2ᵀ
+ b2``) is a sum over its ``d_ff`` neurons. Grouping the neurons into E equal slices gives E
experts whose partial outputs sum to the dense output exactly (up to float summation order):

    y = sum_e expert_e(x) + b2,   expert_e(x) = act(x W1[S_e]ᵀ + b1[S_e]) W2[:, S_e]ᵀ

Per token, :class:`ConvertedFFN` keeps the smallest set of experts whose *share* reaches the
threshold ``t`` and computes only those (gather kept (token, expert) pairs, sort by expert, one
GEMM per segment: :mod:`xmoe.moe.dispatch` + :class:`xmoe.Experts`). Kept experts are not reweighted:
each is exactly its slice of neurons, so ``t = 1`` reproduces the dense FFN.

The share comes from one of three modes (switchable at run time, :meth:`ConvertedFFN.set_mode`):
- ``learned``: ``softmax(x Wrᵀ + br)``, a linear router fitted to predict the oracle share;
- ``oracle``: the true activation mass of each expert for this token (needs the full first
  layer, so it saves no compute; it is the upper bound a router could reach);
- ``dense``: no routing; the concatenated slices run as one dense FFN (the speed reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe.dispatch import permute, plan_dispatch
from ..moe.experts import Experts
from ..routing.base import Routing, pairs_from_sorted
from ..routing.selection import threshold_keep

MODES = ("learned", "oracle", "dense")


@dataclass
class DenseFFN:
    """A dense FFN's weights in ``nn.Linear`` layout (rows of ``w1`` are neurons).

    Attributes:
        w1: ``[d_ff, d_model]`` first layer (the gate projection when gated).
        b1: ``[d_ff]`` or None.
        w2: ``[d_model, d_ff]`` second layer.
        b2: ``[d_model]`` or None.
        act: the activation callable (HF's own module, so conversion is exact).
        w3: ``[d_ff, d_model]`` up projection of a gated FFN (``act(x w1ᵀ) * (x w3ᵀ)``), else None.
        b3: ``[d_ff]`` or None.
    """

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    act: Callable[[Tensor], Tensor]
    w3: Tensor | None = None
    b3: Tensor | None = None

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def gated(self) -> bool:
        return self.w3 is not None

    def neuron_acts(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → ``[N, d_ff]`` neuron activations (what multiplies ``w2``)."""
        a = self.act(F.linear(x, self.w1, self.b1))
        if self.gated:
            a = a * F.linear(x, self.w3, self.b3)
        return a

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(self.neuron_acts(x), self.w2, self.b2)


class SliceExperts(Experts):
    """:class:`xmoe.Experts` whose activation is any callable (e.g. GPT-2's tanh GELU) and whose
    second-layer bias is left to the caller (it must be added once per token, not per expert).

    ``bias`` controls ``b1`` (and ``b3`` when gated); ``b2`` is always None. When ``act`` is
    numerically identical to one of xmoe's built-in activations (exact GELU, ReLU, SiLU), the
    fast built-in backends run it; otherwise ``auto`` uses the ``loop`` backend, which calls
    ``act`` itself.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_expert: int,
        act: Callable[[Tensor], Tensor],
        gated: bool,
        bias: bool,
        backend: str = "auto",
    ) -> None:
        native = builtin_activation(act)
        name = "swiglu" if gated else (native or "gelu")  # "swiglu" makes Experts create w3
        super().__init__(num_experts, d_model, d_expert, name, bias, backend)
        self.b2 = None
        self.act_fn = act
        self.native = native is not None and (not gated or native == "silu")

    def resolve_backend(self, dtype: torch.dtype, device: torch.device | None = None) -> str:
        if self.backend == "auto" and not self.native:
            return "loop"  # the only backend that calls act_fn
        if self.backend != "loop" and not self.native:
            raise ValueError(
                f"backend={self.backend!r} supports only gelu/relu/silu; this FFN's activation "
                f"{type(self.act_fn).__name__} needs backend='loop' or 'auto'"
            )
        return super().resolve_backend(dtype, device)

    def _ffn(self, x: Tensor, expert_idx: Tensor, mm) -> Tensor:
        dtype = x.dtype
        h = mm(x, "w1")
        if self.b1 is not None:
            h = h + self.b1.to(dtype).index_select(0, expert_idx)
        h = self.act_fn(h)
        if self.glu:
            g = mm(x, "w3")
            if self.b3 is not None:
                g = g + self.b3.to(dtype).index_select(0, expert_idx)
            h = h * g
        return mm(h, "w2")


def builtin_activation(act: Callable[[Tensor], Tensor]) -> str | None:
    """``"gelu"``, ``"relu"`` or ``"silu"`` when ``act`` equals that function bit for bit on a grid
    over [-8, 8] (so xmoe's own kernels are exact for it), else None."""
    x = torch.linspace(-8, 8, 2001)
    with torch.no_grad():
        y = act(x)
        for name, f in (("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu)):
            if torch.equal(y, f(x)):
                return name
    return None


def threshold_routing(share: Tensor, threshold: float) -> Routing:
    """XMoE threshold rule with unit weights.

    ``share: [N, E]`` fp32 rows summing to 1. Per token, keep the smallest set of top experts
    whose share reaches ``threshold`` (at least one; all at ``threshold >= 1``). Every kept pair
    gets weight 1: an expert is a slice of the dense FFN, not a mixture component.
    """
    order = share.argsort(dim=-1, descending=True, stable=True)
    ranked = share.gather(1, order)
    keep = threshold_keep(ranked, threshold)
    return pairs_from_sorted(ranked, order, keep, share.shape[-1], torch.ones_like(ranked))


def check_threshold(threshold: float) -> float:
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (ok and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


class ConvertedFFN(nn.Module):
    """A dense FFN split into ``num_experts`` neuron slices with a threshold router.

    ``y = ffn(x)`` with ``x: [..., d_model]`` returns ``[..., d_model]``. After each call,
    ``ffn.last_pairs`` / ``ffn.last_tokens`` hold the number of kept (token, expert) pairs and of
    tokens (Python ints; the threshold rule's ``nonzero`` syncs anyway), and, when
    ``ffn.record_kept`` is set, ``ffn.last_kept: [N]`` the experts kept per token.

    Args:
        d_model, d_ff: the dense FFN's sizes; ``d_ff`` must be divisible by ``num_experts``.
        num_experts: E.
        act: activation callable.
        gated: Llama-style ``act(gate) * up``.
        bias: the dense FFN has biases (first-layer bias per neuron, second-layer bias once).
        threshold: t in (0, 1], the default keep threshold.
        mode: ``"learned"``, ``"oracle"`` or ``"dense"``.
        backend: :class:`xmoe.Experts` backend.

    Parameters / buffers: ``experts`` (the slices), ``out_bias [d_model]``, ``router`` (a
    ``Linear(d_model, E)``), ``neuron_index [E, d_ff / E]`` (which dense neuron each slot holds).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        act: Callable[[Tensor], Tensor],
        gated: bool = False,
        bias: bool = True,
        threshold: float = 1.0,
        mode: str = "learned",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_num_experts(num_experts, d_ff)
        d_expert = d_ff // num_experts
        self.d_model, self.d_ff, self.num_experts, self.d_expert = (
            d_model,
            d_ff,
            num_experts,
            d_expert,
        )
        self.gated = gated
        self.experts = SliceExperts(num_experts, d_model, d_expert, act, gated, bias, backend)
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.router = nn.Linear(d_model, num_experts)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.register_buffer("neuron_index", torch.arange(d_ff).view(num_experts, d_expert))
        self.threshold = check_threshold(threshold)
        self.mode = "learned"
        self.set_mode(mode)
        self._dense_cache: tuple | None = None  # (weight versions, concatenated weights)
        self.last_pairs = 0
        self.last_tokens = 0
        self.record_kept = False  # when True, forward stores last_kept: [N] experts per token
        self.last_kept: Tensor | None = None

    @classmethod
    def from_dense(
        cls, dense: DenseFFN, neuron_index: Tensor, backend: str = "auto", **kwargs
    ) -> ConvertedFFN:
        """Slice ``dense`` into experts: expert e holds neurons ``neuron_index[e]`` (``[E, h]``)."""
        num_experts, d_expert = neuron_index.shape
        if sorted(neuron_index.flatten().tolist()) != list(range(dense.d_ff)):
            raise ValueError("neuron_index must be a permutation of the d_ff neurons")
        ffn = cls(
            dense.d_model,
            dense.d_ff,
            num_experts,
            dense.act,
            gated=dense.gated,
            bias=dense.b1 is not None,
            backend=backend,
            **kwargs,
        )
        idx = neuron_index.to(torch.long)
        with torch.no_grad():
            ex = ffn.experts
            ex.w1.copy_(dense.w1[idx].transpose(1, 2))  # [E, h, d] -> [E, d, h]
            ex.w2.copy_(dense.w2[:, idx].permute(1, 2, 0))  # [d, E, h] -> [E, h, d]
            if dense.gated:
                ex.w3.copy_(dense.w3[idx].transpose(1, 2))
            if ex.b1 is not None:
                ex.b1.copy_(dense.b1[idx])
            if ex.b3 is not None:
                ex.b3.copy_(dense.b3[idx])
            if ffn.out_bias is not None:
                ffn.out_bias.copy_(dense.b2)
            ffn.neuron_index.copy_(idx)
        return ffn

    # ------------------------------------------------------------------ configuration

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def set_threshold(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)

    def to_dense(self) -> DenseFFN:
        """The dense FFN these slices form (neurons in slot order, not the original order)."""
        ex = self.experts
        E, h, d = self.num_experts, self.d_expert, self.d_model
        cat_in = lambda w: w.transpose(1, 2).reshape(E * h, d)  # [E, d, h] -> [d_ff, d]
        return DenseFFN(
            w1=cat_in(ex.w1),
            b1=None if ex.b1 is None else ex.b1.reshape(-1),
            w2=ex.w2.reshape(E * h, d).T,
            b2=self.out_bias,
            act=ex.act_fn,
            w3=None if ex.w3 is None else cat_in(ex.w3),
            b3=None if ex.b3 is None else ex.b3.reshape(-1),
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., {self.d_model}], got {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        n = flat.shape[0]
        if self.mode == "dense":
            y = self._dense_forward(flat)
            self.last_pairs, self.last_tokens = n * self.num_experts, n
            if self.record_kept:
                self.last_kept = torch.full((n,), self.num_experts, device=x.device)
            return y.reshape(x.shape)
        routing = threshold_routing(self.expert_share(flat), self.threshold)
        plan = plan_dispatch(routing)
        rows = self.experts(permute(flat, plan), plan.counts, plan.expert_idx)
        # Combine: every weight is 1, so skip unpermute's per-row scaling and add rows directly.
        base = self.out_bias.to(rows.dtype).expand(n, -1) if self.out_bias is not None else None
        y = (rows.new_zeros(n, self.d_model) if base is None else base.clone()).index_add_(
            0, plan.token_idx, rows
        )
        self.last_pairs, self.last_tokens = routing.num_pairs, n
        if self.record_kept:
            self.last_kept = torch.bincount(routing.token_idx, minlength=n)
        return y.to(x.dtype).reshape(x.shape)

    def expert_share(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → ``[N, E]`` fp32 share of each expert (rows sum to 1)."""
        if self.mode == "oracle":
            return self.oracle_share(x)
        if self.threshold >= 1.0:  # every expert is kept whatever the scores
            return x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts).float()
        return self.router(x.float()).softmax(dim=-1)

    def expert_mass(self, x: Tensor) -> Tensor:
        """``[N, E]`` activation mass: ``sum_{j in e} |a_j| * ||w2[:, j]||`` (a bound on the norm
        of expert e's output)."""
        dense = self.to_dense()
        a = dense.neuron_acts(x).float().abs().view(-1, self.num_experts, self.d_expert)
        w2_norm = self.experts.w2.detach().float().norm(dim=-1)  # [E, h]
        return (a * w2_norm).sum(-1)

    def oracle_share(self, x: Tensor) -> Tensor:
        mass = self.expert_mass(x)
        return mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)

    def _dense_forward(self, x: Tensor) -> Tensor:
        """The slices concatenated into nn.Linear-layout weights, cached until a weight changes
        (in-place updates bump a tensor's ``_version``)."""
        key = tuple((id(p), p._version) for p in self.parameters())
        if self._dense_cache is None or self._dense_cache[0] != key:
            d = self.to_dense()
            ws = tuple(
                None if t is None else t.detach().contiguous()
                for t in (d.w1, d.b1, d.w2, d.b2, d.w3, d.b3)
            )
            self._dense_cache = (key, ws)
        w1, b1, w2, b2, w3, b3 = self._dense_cache[1]
        return DenseFFN(w1, b1, w2, b2, self.experts.act_fn, w3, b3)(x)

    # ------------------------------------------------------------------ accounting

    def flops_per_token(self, experts_per_token: float) -> float:
        """Multiply-add FLOPs (x2) per token: kept experts plus the router (learned mode)."""
        router = 2 * self.d_model * self.num_experts if self.mode == "learned" else 0
        return experts_per_token * self.experts.flops_per_row + router

    @property
    def dense_flops_per_token(self) -> int:
        return self.num_experts * self.experts.flops_per_row

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold}"


def check_num_experts(num_experts: int, d_ff: int) -> None:
    ok = isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts >= 1
    if not ok:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if d_ff % num_experts:
        raise ValueError(
            f"num_experts={num_experts} does not divide the FFN width d_ff={d_ff}; "
            f"choose a divisor of {d_ff}"
        )
