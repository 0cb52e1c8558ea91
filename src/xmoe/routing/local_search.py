"""COMET+ permutation local search (Ibrahim et al., KDD 2023), as a wrapper around any router.

First-order training of a sparse gate can get stuck with a poor assignment of its outputs to the
experts. COMET+ adds a learnable permutation ``P`` between the gate and the experts: the gate's
weight vector ``g: [E]`` of a token is replaced by ``g' = P.T @ g``, i.e. ``g'[e'] = sum_e g[e]
P[e, e']``. During a short search phase early in training ``P`` is relaxed to a doubly stochastic
matrix with Gumbel-Sinkhorn,

    P = Sinkhorn((L + g) / tau),   L: [E, E] learnable,   g ~ Gumbel(0, 1) (training only),

and learned by gradient descent together with the model while ``tau`` is annealed, so the whole
network can move between permutations of the experts; then ``P`` is frozen to the hard
permutation that the Hungarian algorithm picks on ``L`` (the max-weight assignment, which is the
``tau -> 0`` limit of the noise-free Sinkhorn operator) and training continues with it.

The wrapper works on the ragged pairs, so it applies to every router (top-k, hash, DSelect-k,
COMET, DTS, ...): while soft, an inner pair ``(t, e, w)`` becomes the pairs ``(t, e', w * P[e,
e'])`` for the entries of row ``P[e]`` above ``prune_threshold`` (plus the row's argmax), and
pairs that land on the same ``(t, e')`` are merged by summing their weights. Once frozen, ``e``
becomes ``perm[e]`` with the weight unchanged, so the compute is that of the inner router.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int, check_positive, check_range
from .base import Router, Routing
from .dts import anneal, gumbel_like


def sinkhorn(log_alpha: Tensor, iters: int = 20) -> Tensor:
    """The Sinkhorn operator: a doubly stochastic matrix from a score matrix.

    Alternately normalises the rows and the columns of ``exp(log_alpha)`` (in log space, so large
    scores do not overflow). At low temperature (``log_alpha = L / tau``, ``tau -> 0``) and with
    enough iterations the result approaches the permutation matrix of the max-weight assignment
    of ``L``.

    Args:
        log_alpha: ``[..., E, E]`` scores (fp32 recommended).
        iters: row + column normalisation rounds, >= 1.
    Returns:
        ``[..., E, E]`` non-negative matrix whose columns sum to 1 exactly (the last step) and
        whose rows sum to 1 up to the convergence of the iteration. Differentiable.
    """
    check_int("iters", iters, 1)
    if log_alpha.dim() < 2 or log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_alpha must have shape [..., E, E], got {tuple(log_alpha.shape)}")
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha.exp()


def hungarian_permutation(scores: Tensor) -> Tensor:
    """``perm: [E]`` int64 maximising ``sum_e scores[e, perm[e]]`` (scipy's linear_sum_assignment).

    ``scores: [E, E]``. Raises ImportError with a clear message when scipy is missing.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy ships with the test environment
        raise ImportError("the permutation local search needs scipy (pip install scipy)") from err
    rows, cols = linear_sum_assignment(scores.detach().double().cpu().numpy(), maximize=True)
    perm = torch.empty(scores.shape[0], dtype=torch.int64)
    perm[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return perm.to(scores.device)


class PermutationLocalSearch(Router):
    """COMET+ permutation local search around ``inner`` (any :class:`Router`).

    Schedule (driven by :meth:`set_step`, which the trainer calls every step): during the first
    ``search_steps = ceil(search_fraction * total_steps)`` steps the permutation is soft and its
    temperature goes exponentially from ``tau_start`` to ``tau_end``; at the first step
    ``>= search_steps`` it is frozen to ``hungarian(L)``. :meth:`freeze` does that by hand.

    Args:
        inner: the wrapped router; its ``num_experts``, ``uses_token_ids``, loss coefficients and
            default capacity factor are the wrapper's. Forward kwargs (``token_ids``) go to it.
        search_fraction: fraction of training spent searching, in (0, 1]. Default 0.1: COMET+
            searches only early in training (to escape a poor initial assignment), then trains
            most of the run with a fixed permutation, at the inner router's compute.
        tau_start: Sinkhorn temperature at step 0, > 0. Default 1.0: with the identity init P
            starts spread (about 0.47 on the diagonal for E = 4, 0.15 for E = 16), so every
            permutation is reachable.
        tau_end: temperature at the end of the search, in (0, tau_start]. Default 0.05: P is
            then close to a permutation matrix, so freezing it changes the model little.
        sinkhorn_iters: Sinkhorn normalisation rounds, >= 1. Default 20 (Mena et al.'s
            Gumbel-Sinkhorn networks use about 20).
        prune_threshold: entries ``P[e, e'] <= prune_threshold`` are not expanded into pairs (the
            row argmax is always kept), in [0, 1). Default 1e-3: the dropped gate mass is
            negligible and late in the search each pair expands to about one.
        init: ``"identity"`` (default) or ``"uniform"``. The local search starts from the gate as
            it is (the identity permutation is the incumbent solution), so ``L = init_scale * I``;
            ``"uniform"`` starts with ``L = 0`` (P uniform: no preferred assignment). The papers'
            text does not fix this; identity keeps the search local around the current gate.
        init_scale: diagonal value of ``L`` for the identity init, > 0. Default 1.0.
        noise: add Gumbel noise to ``L`` in training. Default True (Gumbel-Sinkhorn; the noise
            makes the search explore permutations).

    Parameters: ``perm_logits`` (L, ``[E, E]`` fp32). Buffers (saved in checkpoints): ``tau``
    (fp32 scalar), ``frozen`` (bool scalar), ``perm`` (``[E]`` int64, identity until frozen).

    Losses and extras: the inner router's, plus extras ``perm_tau`` (the temperature, 0 once
    frozen) and ``perm_frozen`` (1.0 once frozen).
    """

    def __init__(
        self,
        inner: Router,
        *,
        search_fraction: float = 0.1,
        tau_start: float = 1.0,
        tau_end: float = 0.05,
        sinkhorn_iters: int = 20,
        prune_threshold: float = 1e-3,
        init: str = "identity",
        init_scale: float = 1.0,
        noise: bool = True,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown local search option(s) {sorted(unknown)}; accepted: "
                "['init', 'init_scale', 'noise', 'prune_threshold', 'search_fraction', "
                "'sinkhorn_iters', 'tau_end', 'tau_start']"
            )
        if not isinstance(inner, Router):
            raise ValueError(f"inner must be a Router, got {type(inner).__name__}")
        check_range("search_fraction", search_fraction, 0.0, 1.0, low_open=True)
        check_positive("tau_start", tau_start)
        check_positive("tau_end", tau_end)
        if tau_end > tau_start:
            raise ValueError(f"tau_end must be in (0, tau_start={tau_start}], got {tau_end!r}")
        check_int("sinkhorn_iters", sinkhorn_iters, 1)
        check_range("prune_threshold", prune_threshold, 0.0, 1.0, high_open=True)
        check_choice("init", init, ("identity", "uniform"))
        check_positive("init_scale", init_scale)
        check_bool("noise", noise)
        self.inner = inner
        e = inner.num_experts
        self.num_experts = e
        # Router class attributes are the inner router's (instance attributes shadow them).
        self.uses_token_ids = inner.uses_token_ids
        self.default_loss_coefs = dict(inner.default_loss_coefs)
        self.default_capacity_factor = inner.default_capacity_factor
        if callable(getattr(inner, "fit_frequencies", None)):
            self.fit_frequencies = inner.fit_frequencies  # the trainer looks for it on the router
        self.search_fraction = float(search_fraction)
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.sinkhorn_iters = sinkhorn_iters
        self.prune_threshold = float(prune_threshold)
        self.init = init
        self.init_scale = float(init_scale)
        self.noise = noise
        self.perm_logits = nn.Parameter(torch.empty(e, e))
        self.register_buffer("tau", torch.tensor(self.tau_start, dtype=torch.float32))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("perm", torch.arange(e, dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.perm_logits.zero_()
            if self.init == "identity":
                self.perm_logits.diagonal().fill_(self.init_scale)

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    # -- schedule ----------------------------------------------------------------------------

    def search_steps(self, total_steps: int) -> int:
        """Length of the search phase of a ``total_steps`` run (>= 1)."""
        return max(1, math.ceil(self.search_fraction * total_steps))

    @torch.no_grad()
    def set_step(self, step: int, total_steps: int) -> None:
        """Training-step callback: anneal ``tau`` during the search, then freeze (once)."""
        check_int("step", step, 0)
        check_int("total_steps", total_steps, 1)
        if self.is_frozen:
            return
        steps = self.search_steps(total_steps)
        if step >= steps:
            self.freeze()
        else:
            self.tau.fill_(anneal(step, self.tau_start, self.tau_end, steps, "exponential"))

    @torch.no_grad()
    def freeze(self) -> Tensor:
        """Fix the permutation to ``hungarian(L)`` (maximise ``sum_e L[e, perm[e]]``); returns it.

        ``L`` stops receiving gradient (it is no longer used), so the optimizer leaves it as is.
        """
        self.perm.copy_(hungarian_permutation(self.perm_logits.float()))
        self.frozen.fill_(True)
        return self.perm.clone()

    def soft_permutation(self) -> Tensor:
        """``P: [E, E]`` fp32, ``Sinkhorn((L + Gumbel) / tau)`` (noise in training only)."""
        logits = self.perm_logits.float()
        if self.training and self.noise:
            logits = logits + gumbel_like(logits)
        return sinkhorn(logits / self.tau, self.sinkhorn_iters)

    # -- routing -----------------------------------------------------------------------------

    def forward(self, x: Tensor, **kwargs) -> Routing:
        """``x: [N, d_model]`` → the inner routing with its experts permuted (soft or hard)."""
        routing = self.inner(x, **kwargs)
        if self.is_frozen:
            out = self._apply_hard(routing)
            out.extras["perm_tau"] = routing.weight.new_zeros(())
        else:
            out = self._apply_soft(routing, self.soft_permutation())
            out.extras["perm_tau"] = self.tau.detach().clone()
        out.extras["perm_frozen"] = routing.weight.new_tensor(float(self.is_frozen))
        return out

    def _apply_hard(self, routing: Routing) -> Routing:
        return Routing(
            token_idx=routing.token_idx,
            expert_idx=self.perm[routing.expert_idx],
            weight=routing.weight,
            rank=routing.rank,
            score=routing.score,
            num_tokens=routing.num_tokens,
            num_experts=self.num_experts,
            losses=dict(routing.losses),
            num_selected=routing.num_selected,
            extras=dict(routing.extras),
        )

    def _apply_soft(self, routing: Routing, p: Tensor) -> Routing:
        """Expand each pair over row ``P[e]``, prune, merge duplicates ``(t, e')`` by summing.

        Merged pairs come out token-major; within a token ``rank`` orders them by weight
        (0 = largest) and ``score`` is the P-weighted sum of the inner scores.
        """
        e = self.num_experts
        keep = p > self.prune_threshold  # [E, E]
        keep[torch.arange(e, device=p.device), p.argmax(dim=-1)] = True
        pair_i, col = keep[routing.expert_idx].nonzero(as_tuple=True)  # [B] each
        token = routing.token_idx[pair_i]
        p_pair = p[routing.expert_idx[pair_i], col]
        weight = routing.weight[pair_i] * p_pair
        score = routing.score[pair_i] * p_pair.detach()
        key = token * e + col
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        m = uniq.shape[0]
        merged_w = weight.new_zeros(m).index_add(0, inverse, weight)
        merged_s = score.new_zeros(m).index_add(0, inverse, score)
        token_m = torch.div(uniq, e, rounding_mode="floor")
        rank = _rank_within_token(token_m, merged_w.detach(), routing.num_tokens)
        dropped_before = (routing.num_selected or 0) - routing.num_pairs
        return Routing(
            token_idx=token_m,
            expert_idx=uniq - token_m * e,
            weight=merged_w,
            rank=rank,
            score=merged_s,
            num_tokens=routing.num_tokens,
            num_experts=e,
            losses=dict(routing.losses),
            num_selected=m + max(dropped_before, 0),
            extras=dict(routing.extras),
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, frozen={self.is_frozen}, tau={float(self.tau):.4g}, "
            f"search_fraction={self.search_fraction}, tau_start={self.tau_start}, "
            f"tau_end={self.tau_end}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"prune_threshold={self.prune_threshold}, init={self.init!r}"
        )


def _rank_within_token(token: Tensor, weight: Tensor, num_tokens: int) -> Tensor:
    """``[M]`` position of each pair among its token's pairs by descending weight (stable)."""
    if token.numel() == 0:
        return token.clone()
    order = torch.argsort(-weight, stable=True)
    order = order[torch.argsort(token[order], stable=True)]
    counts = torch.bincount(token, minlength=num_tokens)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(token)
    rank[order] = torch.arange(token.numel(), device=token.device) - starts[token[order]]
    return rank
