"""The MoE layer: router → capacity → dispatch → experts → combine. A drop-in FFN replacement."""

from __future__ import annotations

from dataclasses import asdict

from torch import Tensor, nn

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
        **router_options,
    ) -> None:
        super().__init__()
        if experts is None:
            experts = Experts(num_experts, d_model, d_expert, activation, bias, backend)
        self.experts = experts
        if isinstance(router, Router):
            if router_options:
                raise ValueError("router_options are only accepted with a router name")
            if router.num_experts != num_experts:
                raise ValueError(
                    f"router has {router.num_experts} outputs but num_experts={num_experts}"
                )
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
        )

    def forward(self, x: Tensor, **router_kwargs) -> Tensor:
        y, routing = self.forward_with_routing(x, **router_kwargs)
        self.last_routing = routing
        return y

    def forward_with_routing(self, x: Tensor, **router_kwargs) -> tuple[Tensor, Routing]:
        """Like ``forward`` but returns ``(y, routing)`` and keeps no state."""
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
        return out.to(x.dtype).reshape(x.shape), routing

    def dispatch_and_combine(self, flat: Tensor, plan: DispatchPlan) -> Tensor:
        """permute → experts → unpermute for the kept pairs of ``plan``; ``flat: [N, d]``.

        The slot an expert-parallel layer overrides to put its all-to-all around the experts.
        """
        y = self.experts(permute(flat, plan), plan.counts, plan.expert_idx, plan.weight)
        return unpermute(y, plan, weighted=True)

    def compute_ratio(self, experts_per_token: float, d_ff: int) -> float:
        """Expert FLOPs per token over those of a dense FFN of width ``d_ff`` (same activation)."""
        return experts_per_token * self.d_expert / d_ff

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
