"""The MoE layer: router → capacity → dispatch → experts → combine. A drop-in FFN replacement."""

from __future__ import annotations

import inspect
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_float_tensor, check_int, check_kwargs
from ..routing import Router, Routing, make_router, router_class
from ..routing.local_search import PermutationLocalSearch
from .config import MoEConfig
from .dispatch import (
    DispatchPlan,
    apply_capacity,
    check_capacity_factor,
    expert_capacity,
    permute,
    plan_dispatch,
    unpermute,
)
from .experts import Experts

# Keyword arguments MoE.forward passes on to any router (token ids: used by the hash router);
# a router's forward may name more (e.g. the converted FFN's ``share``).
ROUTER_KWARGS = ("token_ids",)


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN.

    ``y = moe(x)`` with ``x: [..., d_model]`` returns ``[..., d_model]``. After each call,
    ``moe.last_routing`` holds the call's :class:`~xmoe.Routing` (kept pairs, losses, stats).

    Args:
        d_model: model width.
        num_experts: E >= 1.
        d_expert: hidden width of each expert (XMoE: small, e.g. d_ff / 8).
        router: a registered router name (see ``xmoe.available_routers()``) or a Router instance.
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"swiglu"``.
        bias: experts have biases.
        capacity_factor: training capacity factor. ``None`` (default) uses the router's default:
            dropless for every router except ``switch`` (1.25). ``"dropless"`` (or ``inf``)
            forces dropless. With a factor, each expert keeps at most ``ceil(cf * N / E)`` pairs.
        eval_capacity_factor: the same in eval mode; ``None`` (default) is dropless, so eval output
            does not depend on which other tokens share the batch.
        backend: expert compute backend, ``"auto"``, ``"grouped_mm"`` or ``"loop"``.
        experts: a prebuilt :class:`Experts` used instead of building one (``activation``,
            ``bias`` and ``backend`` are then its own), e.g. one rank's slice of the experts
            under expert parallelism.
        num_shared_experts: S always-on experts beside the routed ones (DeepSeek-V3,
            Qwen2-MoE): every token runs through each of them with weight 1 (or the gate).
            Default 0. They use the routed experts' activation, bias and backend.
        d_shared: hidden width of each shared expert. Default: ``d_expert``.
        shared_gate: scale the shared experts' output per token by
            ``sigmoid(x @ shared_gate.weight.T)`` (Qwen2-MoE's ``shared_expert_gate``, fp32).
        shared_experts: a prebuilt :class:`Experts` of S shared experts (overrides the two
            options above).
        **router_options: passed to the router (e.g. ``threshold=0.9``, ``k=2``).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_expert: int,
        router: str | Router = "threshold",
        activation: str = "gelu",
        bias: bool = True,
        capacity_factor: float | str | None = None,
        eval_capacity_factor: float | str | None = None,
        backend: str = "auto",
        experts: Experts | None = None,
        num_shared_experts: int = 0,
        d_shared: int | None = None,
        shared_gate: bool = False,
        shared_experts: Experts | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        if experts is None:
            experts = Experts(num_experts, d_model, d_expert, activation, bias, backend)
        self.experts = experts
        check_int("num_shared_experts", num_shared_experts, 0)
        check_bool("shared_gate", shared_gate)
        if shared_experts is None and num_shared_experts > 0:
            d_shared = d_expert if d_shared is None else check_int("d_shared", d_shared, 1)
            shared_experts = Experts(
                num_shared_experts,
                d_model,
                d_shared,
                experts.activation,
                bias=experts.b1 is not None,
                backend=experts.backend,
                glu=experts.glu,
            )
        if shared_gate and shared_experts is None:
            raise ValueError("shared_gate=True needs num_shared_experts >= 1 (or shared_experts)")
        self.shared_experts = shared_experts
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        if isinstance(router, Router):
            if router_options:
                raise ValueError("router_options are only accepted with a router name")
            if router.num_experts != num_experts:
                raise ValueError(
                    f"router has {router.num_experts} outputs but num_experts={num_experts}"
                )
            _check_router_width(router, d_model)
            self.router = router
        else:
            self.router = make_router(router, d_model, num_experts, **router_options)
        if capacity_factor is None:
            capacity_factor = self.router.default_capacity_factor
        capacity_factor = _dropless_to_none("capacity_factor", capacity_factor)
        eval_capacity_factor = _dropless_to_none("eval_capacity_factor", eval_capacity_factor)
        self.d_model = d_model
        self.num_experts = num_experts
        self.d_expert = d_expert
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.last_routing: Routing | None = None

    @classmethod
    def from_config(cls, cfg: MoEConfig, d_model: int, *, vocab_size: int | None = None) -> MoE:
        """The layer ``cfg`` describes, at model width ``d_model``.

        ``vocab_size`` goes to routers that route by token id (hash) unless
        ``cfg.router_options`` sets it. With ``cfg.local_search`` the router is wrapped in
        :class:`~xmoe.routing.local_search.PermutationLocalSearch`. Router options are checked
        by the router (unknown names and out-of-range values raise ``ValueError``).
        """
        options = dict(cfg.router_options)
        if vocab_size is not None and router_class(cfg.router).uses_token_ids:
            options.setdefault("vocab_size", vocab_size)
        router: Router = make_router(cfg.router, d_model, cfg.num_experts, **options)
        if cfg.local_search is not None:
            router = PermutationLocalSearch(router, **asdict(cfg.local_search))
        return cls(
            d_model,
            cfg.num_experts,
            cfg.d_expert,
            router=router,
            activation=cfg.activation,
            bias=cfg.bias,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            backend=cfg.backend,
            num_shared_experts=cfg.shared_experts,
            d_shared=cfg.d_shared,
            shared_gate=cfg.shared_gate,
        )

    def forward(self, x: Tensor, **router_kwargs) -> Tensor:
        y, routing = self.forward_with_routing(x, **router_kwargs)
        self.last_routing = routing
        return y

    def forward_with_routing(self, x: Tensor, **router_kwargs) -> tuple[Tensor, Routing]:
        """Like ``forward`` but returns ``(y, routing)`` and keeps no state."""
        check_float_tensor("x", x)
        if router_kwargs:
            check_kwargs("MoE.forward", router_kwargs, _router_kwargs(self.router))
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}"
            )
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat, **router_kwargs)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is not None:
            routing = apply_capacity(
                routing, expert_capacity(cf, routing.num_tokens, self.num_experts)
            )
        out = self.dispatch_and_combine(flat, plan_dispatch(routing))
        if self.shared_experts is not None:
            out = out + self.shared_output(flat)
        return out.to(x.dtype).reshape(x.shape), routing

    def shared_output(self, flat: Tensor) -> Tensor:
        """``flat: [N, d]`` → fp32 ``[N, d]``: the sum of the shared experts over every token,
        each scaled by the shared gate when there is one. One call of the expert kernel."""
        shared = self.shared_experts
        n, s = flat.shape[0], shared.num_experts
        rows = flat if s == 1 else flat.repeat(s, 1)
        counts = torch.full((s,), n, dtype=torch.long, device=flat.device)
        idx = torch.arange(s, device=flat.device).repeat_interleave(n)
        weight = None
        if self.shared_gate is not None:
            with torch.autocast(device_type=flat.device.type, enabled=False):
                gate = F.linear(flat.float(), self.shared_gate.weight.float()).sigmoid()
            weight = gate.squeeze(-1).repeat(s)
        y = shared(rows, counts, idx, weight).float()
        return y if s == 1 else y.view(s, n, -1).sum(0)

    def dispatch_and_combine(self, flat: Tensor, plan: DispatchPlan) -> Tensor:
        """permute → experts → unpermute for the kept pairs of ``plan``; ``flat: [N, d]``.

        The slot an expert-parallel layer overrides to put its all-to-all around the experts.
        """
        y = self.experts(permute(flat, plan), plan.counts, plan.expert_idx, plan.weight)
        return unpermute(y, plan, weighted=True)

    def compute_ratio(self, experts_per_token: float, d_ff: int) -> float:
        """Expert FLOPs per token over those of a dense FFN of width ``d_ff`` (same activation).

        ``experts_per_token`` counts the routed experts; the shared experts add theirs."""
        return self.expert_width_per_token(experts_per_token) / d_ff

    def expert_width_per_token(self, experts_per_token: float) -> float:
        """Expert hidden units computed per token: routed ``k * d_expert`` plus shared."""
        shared = self.shared_experts
        width = 0 if shared is None else shared.num_experts * shared.d_expert
        return experts_per_token * self.d_expert + width

    def expert_flops_per_token(self, experts_per_token: float) -> float:
        """Expert FLOPs per token (routed at ``experts_per_token``, plus shared), biases and
        router excluded."""
        shared = self.shared_experts
        extra = 0 if shared is None else shared.num_experts * shared.flops_per_row
        return experts_per_token * self.experts.flops_per_row + extra

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}"
        )


def _dropless_to_none(name: str, value: float | str | None) -> float | None:
    """``"dropless"`` / ``inf`` / None → None; otherwise a validated factor > 0."""
    if value == "dropless" or value == float("inf"):
        return None
    check_capacity_factor(name, value)
    return value


def _check_router_width(router: Router, d_model: int) -> None:
    """A Router instance must read rows of width ``d_model`` (a wrapper: its inner router's)."""
    width = getattr(router, "d_model", None)
    if width is None:
        width = getattr(getattr(router, "inner", None), "d_model", None)
    if width is not None and width != d_model:
        raise ValueError(f"router reads rows of d_model={width} but the MoE has d_model={d_model}")


def _router_kwargs(router: Router) -> set[str]:
    """The keyword arguments ``router`` takes: :data:`ROUTER_KWARGS` and those its ``forward``
    (or a wrapper's inner router's) names."""
    names = set(ROUTER_KWARGS)
    for r in (router, getattr(router, "inner", None)):
        if isinstance(r, Router):
            params = inspect.signature(type(r).forward).parameters.values()
            names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
            names |= {p.name for p in list(params)[2:] if p.kind is p.POSITIONAL_OR_KEYWORD}
    return names
