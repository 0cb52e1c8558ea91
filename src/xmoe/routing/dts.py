"""EvoMoE's Dense-to-Sparse gate (Nie et al., 2021, arXiv 2112.14397).

The gate starts dense and becomes sparse as its temperature falls during training:

    G = softmax((x @ W.T + g) / tau),   g ~ Gumbel(0, 1) i.i.d. per (token, expert), training only

Every expert whose gate value is below a small threshold is dropped (never computed); the
surviving gate values are the combine weights. A high starting temperature spreads each token
over (almost) all experts, so every expert receives gradient early on; as ``tau`` falls, G
concentrates on a few experts and the number of active experts per token falls with it. An
optional switch turns the gate into hard top-1 (Switch-style) routing late in training.

The temperature is driven by the training step through ``set_step(step, total_steps)`` (the
trainer's ``notify_step`` calls it at the start of every step). The current temperature and step
live in registered buffers, so a model loaded from a checkpoint routes with the trained ``tau``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, check_positive, check_range
from .base import LinearRouter, Routing
from .selection import select_sorted

SCHEDULES = ("exponential", "linear")


def gumbel_like(t: Tensor) -> Tensor:
    """Standard Gumbel(0, 1) noise with ``t``'s shape, dtype and device: ``-log(-log U)``."""
    tiny = torch.finfo(t.dtype).tiny
    u = torch.rand_like(t).clamp_(tiny, 1.0 - torch.finfo(t.dtype).eps)
    return -torch.log(-torch.log(u))


def anneal(step: int, start: float, end: float, steps: int, schedule: str = "exponential") -> float:
    """Temperature at ``step`` of a schedule from ``start`` (step 0) to ``end`` (step ``steps``).

    ``exponential``: ``start * (end / start) ** (s / steps)`` (a constant ratio per step);
    ``linear``: ``start + (end - start) * s / steps``. Constant ``end`` from ``steps`` on.
    """
    frac = min(max(step, 0) / max(steps, 1), 1.0)
    if schedule == "exponential":
        return start * (end / start) ** frac
    return start + (end - start) * frac


class DenseToSparseRouter(LinearRouter):
    """EvoMoE's Dense-to-Sparse (DTS) gate.

    For ``x: [N, d_model]``: ``logits = x @ W.T`` (``[N, E]``, fp32), ``G = softmax((logits +
    g) / tau)`` with Gumbel noise ``g`` in training only (eval is deterministic). Expert ``e`` is
    kept for token ``t`` iff ``G[t, e] >= drop_threshold``; the argmax of ``G[t]`` is always kept
    (ties: lower expert index), so every token has at least one expert. Pair weight: ``G[t, e]``,
    or with ``renormalize`` ``G[t, e] / sum_kept G[t]``. Ranks follow G (0 = largest).

    After ``hard_top1_after`` steps the gate is hard top-1: only the argmax of G is kept, with
    weight ``G[t, argmax]`` (``renormalize=True`` makes it 1.0). We keep the gate value rather
    than 1.0 because the paper's gate ends as a Switch-style top-1 gate, whose output is scaled
    by the gate probability; that product is what still gives the router weight a gradient.

    Active experts per token never increase as ``tau`` falls (same logits, no noise) for the
    sizes used in practice: an expert below the threshold gains mass as ``tau`` falls only if its
    logit is above the G-weighted mean logit, which needs at least ``e * r * ln r`` experts below
    it, ``r = G_max / G_e >= 1 / (E * drop_threshold)``. That is impossible for E <= 80 at the
    default threshold 1e-3 (for much larger E a mid-ranked expert can cross upwards).

    Args:
        d_model: input width.
        num_experts: E.
        tau_start: temperature at step 0, > 0. Default 2.0: EvoMoE starts hot so the gate is
            near-dense and every expert is trained.
        tau_end: temperature at the end of the anneal, > 0. Default 0.3: EvoMoE's final
            temperature, where G is peaked enough that most tokens keep one or two experts.
        schedule: ``"exponential"`` (default; EvoMoE decays tau by a constant factor per step,
            so sparsity grows steadily rather than all at the end) or ``"linear"``.
        anneal_steps: steps over which tau goes from ``tau_start`` to ``tau_end``, >= 1.
            Default None: the ``total_steps`` passed to :meth:`set_step` (the whole run).
        hard_top1_after: from this step on (>= 0) the routing is hard top-1. Default None (never):
            the switch is an option of the recipe; the threshold gate is already sparse at
            ``tau_end``.
        drop_threshold: experts with ``G < drop_threshold`` are dropped, in [0, 1). Default 1e-3:
            small enough that the dropped mass is negligible (< E * 1e-3), large enough that a
            peaked G drops almost every expert.
        renormalize: divide the kept weights by their per-token sum. Default False: EvoMoE
            combines with the raw gate values (the dropped mass is tiny).
        init_std: router weight init std. Default ``3 / sqrt(d_model)`` (as the threshold router):
            with a near-zero init (0.02) G stays near uniform at every tau and the gate never
            becomes sparse; with logits of std ~3 the anneal alone goes from near-dense at
            tau 2 to about one or two experts at tau 0.3.
        **kwargs: see :class:`LinearRouter` (``balance_over``, ``check_finite``).

    Buffers (saved in checkpoints): ``tau`` (fp32 scalar, the current temperature) and ``step``
    (int64 scalar, the last step given to :meth:`set_step`).

    Losses: LinearRouter's ``load_balance`` (on G) and ``z_loss`` (on the raw logits).
    Extras: ``tau`` (the temperature used) and ``hard_top1`` (1.0 when the hard switch is on).
    """

    # 0.01 / 0.001: the Switch load-balance and ST-MoE z-loss coefficients (LinearRouter's).
    default_loss_coefs = {"load_balance": 0.01, "z_loss": 0.001}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        tau_start: float = 2.0,
        tau_end: float = 0.3,
        schedule: str = "exponential",
        anneal_steps: int | None = None,
        hard_top1_after: int | None = None,
        drop_threshold: float = 1e-3,
        renormalize: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        check_positive("tau_start", tau_start)
        check_positive("tau_end", tau_end)
        check_choice("schedule", schedule, SCHEDULES)
        if anneal_steps is not None:
            check_int("anneal_steps", anneal_steps, 1)
        if hard_top1_after is not None:
            check_int("hard_top1_after", hard_top1_after, 0)
        check_range("drop_threshold", drop_threshold, 0, 1, high_open=True)
        check_bool("renormalize", renormalize)
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.schedule = schedule
        self.anneal_steps = anneal_steps
        self.hard_top1_after = hard_top1_after
        self.drop_threshold = float(drop_threshold)
        self.renormalize = renormalize
        self.register_buffer("tau", torch.tensor(self.tau_start, dtype=torch.float32))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))

    @staticmethod
    def default_init_std(d_model: int) -> float:
        return 3.0 / math.sqrt(d_model)

    # -- schedule ----------------------------------------------------------------------------

    def tau_at(self, step: int, total_steps: int) -> float:
        """The scheduled temperature at ``step`` of a ``total_steps`` run (no side effects)."""
        steps = self.anneal_steps if self.anneal_steps is not None else total_steps
        return anneal(step, self.tau_start, self.tau_end, steps, self.schedule)

    @torch.no_grad()
    def set_step(self, step: int, total_steps: int) -> None:
        """Training-step callback: set ``tau`` (and the hard top-1 switch) for ``step``.

        Args:
            step: the step about to run, >= 0.
            total_steps: the run length, >= 1 (the anneal length when ``anneal_steps`` is None).
        """
        check_int("step", step, 0)
        check_int("total_steps", total_steps, 1)
        self.tau.fill_(self.tau_at(step, total_steps))
        self.step.fill_(step)

    @property
    def hard_top1(self) -> bool:
        """Whether routing is hard top-1 now (``step >= hard_top1_after``)."""
        return self.hard_top1_after is not None and int(self.step) >= self.hard_top1_after

    # -- routing -----------------------------------------------------------------------------

    def gate(self, logits: Tensor) -> Tensor:
        """``logits: [N, E]`` fp32 → ``G: [N, E]``, the tempered (noisy in training) softmax."""
        if self.training:
            logits = logits + gumbel_like(logits)
        return (logits / self.tau.to(logits.dtype)).softmax(dim=-1)

    def forward(self, x: Tensor, **kwargs) -> Routing:
        """``x: [N, d_model]`` → kept pairs; extra kwargs (e.g. ``token_ids``) are ignored."""
        logits = self.logits(x)
        probs = self.gate(logits)
        routing = self.select(probs)
        routing.losses.update(self.standard_losses(logits, probs, routing))
        routing.extras["tau"] = self.tau.detach().clone()
        routing.extras["hard_top1"] = probs.new_tensor(float(self.hard_top1))
        return routing

    def select(self, probs: Tensor) -> Routing:
        """``probs: [N, E]`` (G) → pairs with ``G >= drop_threshold`` plus each token's argmax."""
        if self.hard_top1:
            keep_fn = _keep_first
        else:
            keep_fn = lambda ranked: _keep_first(ranked) | (ranked >= self.drop_threshold)
        return select_sorted(probs, keep_fn, self.renormalize)

    def extra_repr(self) -> str:
        return (
            f"tau={float(self.tau):.4g}, tau_start={self.tau_start}, tau_end={self.tau_end}, "
            f"schedule={self.schedule!r}, anneal_steps={self.anneal_steps}, "
            f"hard_top1_after={self.hard_top1_after}, drop_threshold={self.drop_threshold}, "
            f"renormalize={self.renormalize}"
        )


def _keep_first(ranked: Tensor) -> Tensor:
    """``[N, E]`` keep mask with only rank 0 (each token's most probable expert)."""
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    keep[:, :1] = True
    return keep
