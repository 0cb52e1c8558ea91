"""One router for the pretrained MoE families: a score function plus a selection rule.

The Hugging Face MoE families differ only in how they score experts and which they keep:

========================  =========  ==============  =====================================
family                    score      normalise kept  other
========================  =========  ==============  =====================================
Mixtral                   softmax    yes             -
OLMoE, Qwen2-MoE, Qwen3   softmax    option          (Qwen2-MoE: a gated shared expert)
DeepSeek-V3               sigmoid    option          selection bias, groups, scaling
========================  =========  ==============  =====================================

:class:`ScoredRouter` covers all of them, and lets any of them use another selection rule:

1. ``logits = x @ W.T`` (fp32); ``scores = softmax(logits)`` or ``sigmoid(logits)``.
2. The *selection score* is ``scores + bias`` (a per-expert buffer, e.g. DeepSeek-V3's
   ``e_score_correction_bias``; it changes which experts are chosen, never their weights).
3. Group-limited selection (DeepSeek-V3): experts form ``num_groups`` equal groups; a group's
   score is the sum of its two best selection scores; only experts of the ``topk_groups``
   best groups are eligible.
4. Experts are ranked by selection score and a prefix is kept by the rule:
   - ``topk``: the ``k`` best;
   - ``threshold``: the smallest prefix whose *share* reaches ``t``. The share is the selection
     score, clamped at 0 and normalised over the eligible experts. For plain softmax (no bias,
     no groups) it is the probability itself, so this is the XMoE threshold rule;
   - ``entropy_k``: ``k`` per token from the normalised entropy ``H / log(eligible)`` of the
     share: ``k = 1 + #{cut-offs below H}`` (fixed cut-offs; a baseline for adaptive k).
5. The combine weight is the family's: the unbiased score of each kept expert, divided by the
   kept sum when ``normalize``, times ``scaling`` (DeepSeek-V3's ``routed_scaling_factor``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, check_positive, check_range
from .base import LinearRouter, Routing, pairs_from_sorted
from .selection import threshold_keep

SCORES = ("softmax", "sigmoid")
SELECTIONS = ("topk", "threshold", "entropy_k")


class ScoredRouter(LinearRouter):
    """Score function (softmax | sigmoid) + selection rule (topk | threshold | entropy_k).

    Args:
        score: ``"softmax"`` (Mixtral, OLMoE, Qwen) or ``"sigmoid"`` (DeepSeek-V3).
        selection: ``"topk"``, ``"threshold"`` or ``"entropy_k"`` (see the module docstring).
        k: experts per token of ``topk``, in [1, E]. Default 2.
        threshold: t of ``threshold``, in (0, 1]. Default 0.9 (the XMoE paper's setting).
        max_experts: optional cap on the experts per token of ``threshold`` and ``entropy_k``.
        candidates: ``threshold`` and ``entropy_k`` choose among the top ``candidates``
            experts (by selection score) only, and the share is normalised over them. With the
            native k this is a threshold *within* the family's top-k: keep the smallest prefix
            of the top-k whose renormalised mass reaches t. Default None: all eligible experts.
        entropy_cutoffs: ascending cut-offs in (0, 1] on the normalised entropy for
            ``entropy_k``; ``len + 1`` is its largest k. Default (0.5,): k in {1, 2}.
        normalize: divide the kept weights by their sum (Mixtral; ``norm_topk_prob``).
        scaling: factor on the combine weights (``routed_scaling_factor``). Default 1.
        num_groups: expert groups of group-limited selection (``n_group``); must divide E.
        topk_groups: groups a token may use (``topk_group``), in [1, num_groups]. Default: all.
        selection_bias: keep a per-expert bias buffer ``selection_bias`` [E] added to the
            scores for selection only (DeepSeek-V3's ``e_score_correction_bias``).
        loss_free_balance: after each training forward move ``selection_bias`` by
            ``bias_update_rate`` towards the under-loaded experts (sign update, no gradient);
            it works on any score function. Implies ``selection_bias``.
        bias_update_rate: step of that update. Default 1e-3 (DeepSeek-V3's gamma).
        **kwargs: see :class:`LinearRouter` (``init_std``, ``balance_over``, ``check_finite``).

    The load-balance loss uses the scores normalised to sum 1 per token (for softmax: the
    probabilities).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        score: str = "softmax",
        selection: str = "topk",
        k: int = 2,
        threshold: float = 0.9,
        max_experts: int | None = None,
        candidates: int | None = None,
        entropy_cutoffs: tuple[float, ...] | list[float] = (0.5,),
        normalize: bool = False,
        scaling: float = 1.0,
        num_groups: int = 1,
        topk_groups: int | None = None,
        selection_bias: bool = False,
        loss_free_balance: bool = False,
        bias_update_rate: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        check_choice("score", score, SCORES)
        check_choice("selection", selection, SELECTIONS)
        check_int("k", k, 1, num_experts)
        check_range("threshold", threshold, 0, 1, low_open=True)
        if max_experts is not None:
            check_int("max_experts", max_experts, 1, num_experts)
        if candidates is not None:
            check_int("candidates", candidates, 1, num_experts)
        cutoffs = tuple(entropy_cutoffs)
        for c in cutoffs:
            check_range("entropy_cutoffs", c, 0, 1, low_open=True)
        if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
            raise ValueError(f"entropy_cutoffs must be strictly ascending, got {list(cutoffs)}")
        check_bool("normalize", normalize)
        check_positive("scaling", scaling)
        check_int("num_groups", num_groups, 1, num_experts)
        if num_experts % num_groups:
            raise ValueError(
                f"num_groups must divide num_experts={num_experts}, got num_groups={num_groups}"
            )
        topk_groups = num_groups if topk_groups is None else topk_groups
        check_int("topk_groups", topk_groups, 1, num_groups)
        check_bool("selection_bias", selection_bias)
        check_bool("loss_free_balance", loss_free_balance)
        check_range("bias_update_rate", bias_update_rate, 0, math.inf)
        if selection == "topk" and num_groups > 1 and k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"k must be at most topk_groups * experts per group = "
                f"{topk_groups * (num_experts // num_groups)}, got k={k}"
            )
        self.score, self.selection = score, selection
        self.k, self.threshold, self.max_experts = k, float(threshold), max_experts
        self.candidates = candidates
        self.entropy_cutoffs = cutoffs
        self.normalize, self.scaling = normalize, float(scaling)
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.loss_free_balance = loss_free_balance
        self.bias_update_rate = float(bias_update_rate)
        self.has_bias = selection_bias or loss_free_balance
        if self.has_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts))

    def options(self) -> dict:
        """The keyword options that rebuild this router (``ScoredRouter(d, E, **options)``)."""
        return {
            "score": self.score,
            "selection": self.selection,
            "k": self.k,
            "threshold": self.threshold,
            "max_experts": self.max_experts,
            "candidates": self.candidates,
            "entropy_cutoffs": self.entropy_cutoffs,
            "normalize": self.normalize,
            "scaling": self.scaling,
            "num_groups": self.num_groups,
            "topk_groups": self.topk_groups,
            "selection_bias": self.has_bias,
            "loss_free_balance": self.loss_free_balance,
            "bias_update_rate": self.bias_update_rate,
            "balance_over": self.balance_over,
            "check_finite": self.check_finite,
        }

    def scores(self, logits: Tensor) -> Tensor:
        """``[N, E]`` fp32 family scores (softmax or sigmoid of the logits)."""
        return logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()

    def selection_scores(self, scores: Tensor) -> Tensor:
        """``[N, E]`` detached selection scores: biased, with the experts outside the best
        groups at ``-inf``."""
        choice = scores.detach()
        if self.has_bias:
            choice = choice + self.selection_bias.to(choice.dtype)
        if self.topk_groups < self.num_groups:
            n, e = choice.shape
            grouped = choice.view(n, self.num_groups, e // self.num_groups)
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            groups = best.topk(self.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(best, dtype=torch.bool).scatter_(1, groups, True)
            allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(n, e)
            choice = choice.masked_fill(~allowed, -math.inf)
        return choice

    def share(self, scores: Tensor, choice: Tensor) -> Tensor:
        """``[N, E]`` the selection score as a distribution over the eligible experts.

        For plain softmax (no bias, no groups) it is ``scores`` itself."""
        plain = not self.has_bias and self.topk_groups == self.num_groups
        if self.score == "softmax" and plain:
            return scores.detach()
        eligible = torch.isfinite(choice)
        mass = torch.where(eligible, choice.clamp_min(0), torch.zeros_like(choice))
        total = mass.sum(-1, keepdim=True)
        mass = torch.where(total > 0, mass, eligible.to(mass.dtype))  # all <= 0: uniform
        return mass / mass.sum(-1, keepdim=True)

    def forward(self, x: Tensor, **kwargs) -> Routing:
        logits = self.logits(x)
        scores = self.scores(logits)
        routing = self.select(scores)
        dist = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        routing.losses.update(self.standard_losses(logits, dist, routing))
        if self.loss_free_balance and self.training:
            self._update_bias(routing)
        return routing

    def select(self, scores: Tensor) -> Routing:
        """``scores: [N, E]`` fp32 family scores → the kept pairs (token-major, rank-minor)."""
        choice = self.selection_scores(scores)
        if self.candidates is not None and self.selection != "topk":
            return self._select_candidates(scores, choice)
        if self.selection == "topk":
            order = choice.topk(self.k, dim=-1, sorted=True).indices
            keep = torch.ones_like(order, dtype=torch.bool)
        else:
            share = self.share(scores, choice)
            if self.selection == "threshold":
                order = self._threshold_order(choice, share)
                keep = threshold_keep(share.gather(1, order), self.threshold, self.max_experts)
            else:
                k = self.token_k(share, torch.isfinite(choice))
                width = int(k.max()) if k.numel() else 1  # the one host sync: a size
                order = choice.topk(width, dim=-1, sorted=True).indices
                keep = torch.arange(width, device=k.device).unsqueeze(0) < k.unsqueeze(-1)
            keep = keep & torch.isfinite(choice.gather(1, order))
        return self._pairs(scores, order, keep)

    def _select_candidates(self, scores: Tensor, choice: Tensor) -> Routing:
        """``threshold`` / ``entropy_k`` among the top ``candidates`` only: every step works
        on ``[N, candidates]`` (the share is renormalised over them)."""
        order = choice.topk(self.candidates, dim=-1, sorted=True).indices
        ranked_choice = choice.gather(1, order)
        eligible = torch.isfinite(ranked_choice)
        mass = torch.where(eligible, ranked_choice.clamp_min(0), torch.zeros_like(ranked_choice))
        total = mass.sum(-1, keepdim=True)
        mass = torch.where(total > 0, mass, eligible.to(mass.dtype))  # all <= 0: uniform
        share = mass / mass.sum(-1, keepdim=True)
        if self.selection == "threshold":
            keep = threshold_keep(share, self.threshold, self.max_experts)
        else:
            k = self.token_k(share, eligible)
            ranks = torch.arange(order.shape[1], device=k.device)
            keep = ranks.unsqueeze(0) < k.unsqueeze(-1)
        return self._pairs(scores, order, keep & eligible)

    def _pairs(self, scores: Tensor, order: Tensor, keep: Tensor) -> Routing:
        """Kept pairs with the family's combine weights (normalised, scaled)."""
        ranked = scores.gather(1, order)
        weights = ranked
        if self.normalize:
            kept_sum = (ranked * keep).sum(-1, keepdim=True)
            weights = ranked / kept_sum.clamp_min(torch.finfo(ranked.dtype).tiny)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return pairs_from_sorted(ranked, order, keep, self.num_experts, weights)

    def _threshold_order(self, choice: Tensor, share: Tensor) -> Tensor:
        """``[N, m]`` the top ``m`` experts by selection score, enough ranks for the threshold
        rule. It tries ``m = max(4, 2k)``, then doubles ``m`` (one ``topk`` and one host sync
        each) until every token's share in the top ``m`` reaches ``t``; past ``E / 2`` it
        ranks all ``E``. The kept prefix is the same for any such ``m``: rank ``r``'s keep
        depends only on the ranks above it."""
        n, e = choice.shape
        cap = e if self.max_experts is None else self.max_experts
        width = min(cap, max(4, 2 * self.k))
        while self.threshold < 1.0 and n and width < cap and 2 * width <= e:
            top = choice.topk(width, dim=-1, sorted=True).indices
            if bool((share.gather(1, top).sum(-1) >= self.threshold).all()):
                return top
            width *= 2
        if cap < e:
            return choice.topk(cap, dim=-1, sorted=True).indices
        return choice.argsort(dim=-1, descending=True, stable=True)

    def token_k(self, share: Tensor, eligible: Tensor) -> Tensor:
        """``[N]`` int64 experts per token of ``entropy_k``: ``1 + #{cut-offs < H_norm}``, with
        ``H_norm`` the entropy of the share over the eligible experts / log(#eligible)."""
        p = share
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
        n_eligible = eligible.sum(-1).clamp_min(2).to(p.dtype)
        h = ent / n_eligible.log()
        cut = torch.tensor(self.entropy_cutoffs, dtype=p.dtype, device=p.device)
        k = (1 + (h.unsqueeze(-1) > cut).sum(-1)).clamp_max(p.shape[-1])
        if self.max_experts is not None:
            k = k.clamp_max(self.max_experts)
        return k

    @torch.no_grad()
    def _update_bias(self, routing: Routing) -> None:
        load = routing.expert_counts.float()
        if self.reduce_stats is not None:
            load = self.reduce_stats(load)
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def extra_repr(self) -> str:
        rule = {
            "topk": f"k={self.k}",
            "threshold": f"threshold={self.threshold}, max_experts={self.max_experts}, "
            f"candidates={self.candidates}",
            "entropy_k": f"entropy_cutoffs={list(self.entropy_cutoffs)}",
        }[self.selection]
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, score={self.score}, "
            f"selection={self.selection}, {rule}, normalize={self.normalize}, "
            f"scaling={self.scaling}, groups={self.topk_groups}/{self.num_groups}, "
            f"bias={self.has_bias}"
        )
