"""The converted FFN: a dense FFN's neurons sliced into E experts, an :class:`xmoe.MoE`.

A dense FFN ``y = act(x W1ᵀ + b1) W2ᵀ + b2`` (or, gated, ``(act(x Wgᵀ + bg) * (x Wuᵀ + bu)) W2ᵀ
+ b2``) is a sum over its ``d_ff`` neurons. Grouping the neurons into E equal slices gives E
experts whose partial outputs sum to the dense output exactly (up to float summation order):

    y = sum_e expert_e(x) + b2,   expert_e(x) = act(x W1[S_e]ᵀ + b1[S_e]) W2[:, S_e]ᵀ

:class:`ConvertedFFN` is an :class:`xmoe.MoE`: its router is a :class:`~.router.SliceRouter`
(per token, the smallest set of experts whose *share* reaches the threshold ``t``, each with
weight 1), its experts are :class:`xmoe.Experts` with the dense FFN's own activation callable and
no per-expert output bias, and its combine adds the rows unscaled onto ``b2``, once per token.
Kept experts are not reweighted: each is exactly its slice of neurons, so ``t = 1`` reproduces
the dense FFN.

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

from .._checks import check_choice, check_int
from ..moe.dispatch import DispatchPlan, permute
from ..moe.experts import Experts
from ..moe.layer import MoE
from .router import SliceRouter

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


class ConvertedFFN(MoE):
    """A dense FFN split into ``num_experts`` neuron slices: an :class:`xmoe.MoE` whose router is
    a :class:`~.router.SliceRouter`.

    ``y = ffn(x)`` with ``x: [..., d_model]`` returns ``[..., d_model]``. After each call,
    ``ffn.last_routing`` holds the call's :class:`~xmoe.Routing` (None in dense mode),
    ``ffn.last_pairs`` / ``ffn.last_tokens`` the number of kept (token, expert) pairs and of
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
        backend: :class:`xmoe.Experts` backend (``auto`` runs ``loop`` for an activation that
            is no built-in, e.g. GPT-2's tanh GELU).
        router_score: the slice router's ``score`` (``softmax`` or ``sigmoid``).

    Parameters / buffers: ``experts`` (the slices; no per-expert output bias), ``router`` (the
    slice router: ``weight [E, d_model]``, ``bias [E]``), ``out_bias [d_model]``,
    ``neuron_index [E, d_ff / E]`` (which dense neuron each slot holds).
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
        router_score: str = "softmax",
    ) -> None:
        check_num_experts(num_experts, d_ff)
        d_expert = d_ff // num_experts
        experts = Experts(
            num_experts, d_model, d_expert, act, bias, backend, glu=gated, output_bias=False
        )
        router = SliceRouter(d_model, num_experts, threshold, score=router_score)
        super().__init__(d_model, num_experts, d_expert, router=router, experts=experts)
        self.d_ff = d_ff
        self.gated = gated
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.register_buffer("neuron_index", torch.arange(d_ff).view(num_experts, d_expert))
        self.mode = "learned"
        self.set_mode(mode)
        self._dense_cache: tuple | None = None  # (weight versions, concatenated weights)
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
        self.mode = check_choice("mode", mode, MODES)

    @property
    def threshold(self) -> float:
        """The keep threshold t (the slice router's)."""
        return self.router.threshold

    def set_threshold(self, threshold: float) -> None:
        self.router.set_threshold(threshold)

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
            act=ex.act.fn,
            w3=None if ex.w3 is None else cat_in(ex.w3),
            b3=None if ex.b3 is None else ex.b3.reshape(-1),
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., {self.d_model}], got {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        n = flat.shape[0]
        self.last_tokens = n
        # At t >= 1 every expert is kept whatever the scores: the dense FFN computes exactly
        # that, in one GEMM pair instead of E segments.
        if self.mode == "dense" or (self.mode == "learned" and self.threshold >= 1.0):
            self.last_routing = None
            y = self._dense_forward(flat)
        else:
            share = self.oracle_share(flat) if self.mode == "oracle" else None
            y, self.last_routing = self.forward_with_routing(flat, share=share)
        if self.record_kept:
            r = self.last_routing
            self.last_kept = (
                torch.full((n,), self.num_experts, device=x.device)
                if r is None
                else torch.bincount(r.token_idx, minlength=n)
            )
        return y.reshape(x.shape)

    def dispatch_and_combine(self, flat: Tensor, plan: DispatchPlan) -> Tensor:
        """permute → experts → the sum per token, onto the output bias (added once per token).

        Every kept pair has weight 1 (an expert is a slice of neurons), so the rows are added
        unscaled: the experts get no row weights, and there is no weighted unpermute.
        """
        rows = self.experts(permute(flat, plan), plan.counts, plan.expert_idx)
        n = plan.num_tokens
        if self.out_bias is None:
            out = rows.new_zeros(n, self.d_model)
        else:
            out = self.out_bias.to(rows.dtype).expand(n, -1).clone()
        return out.index_add_(0, plan.token_idx, rows)

    @property
    def last_pairs(self) -> int:
        """Kept (token, expert) pairs of the last call (all ``N * E`` in dense mode)."""
        r = self.last_routing
        return self.last_tokens * self.num_experts if r is None else r.num_pairs

    @torch.no_grad()
    def keep_mask(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → ``[N, E]`` bool: the experts this FFN keeps for each row in its
        current mode and threshold (all of them in dense mode or at t >= 1)."""
        flat = x.reshape(-1, self.d_model)
        n = flat.shape[0]
        if self.mode == "dense" or self.threshold >= 1.0:
            return torch.ones(n, self.num_experts, dtype=torch.bool, device=x.device)
        share = self.oracle_share(flat) if self.mode == "oracle" else None
        r = self.router(flat, share=share)
        mask = torch.zeros(n, self.num_experts, dtype=torch.bool, device=x.device)
        mask[r.token_idx, r.expert_idx] = True
        return mask

    def expert_share(self, x: Tensor) -> Tensor:
        """``x: [N, d_model]`` → ``[N, E]`` fp32 share of each expert (rows sum to 1)."""
        return self.oracle_share(x) if self.mode == "oracle" else self.router.share(x)

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
        return DenseFFN(w1, b1, w2, b2, self.experts.act.fn, w3, b3)(x)

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
    """An integer >= 1 that divides ``d_ff``."""
    check_int("num_experts", num_experts, 1)
    if d_ff % num_experts:
        raise ValueError(
            f"num_experts={num_experts} does not divide the FFN width d_ff={d_ff}; "
            f"choose a divisor of {d_ff}"
        )
