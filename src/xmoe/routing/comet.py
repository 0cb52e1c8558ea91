"""COMET gate (Ibrahim, Chen, Hazimeh, Ponomareva, Zhao, Mazumder, KDD 2023).

k soft binary trees of depth ``D = ceil(log2 E)``; leaf e of every tree is expert e. Internal
node j of tree i sends a token left with probability ``S_gamma(w_ij^T x)`` (right with ``1 - S``),
so the path probability ``mu_ie(x)`` of leaf e is the product of the branch probabilities along
its root-to-leaf path and sums to 1 over the tree's 2^D leaves. Each leaf also has a linear logit
``a_ie = v_ie^T x``. The gate is one softmax over all ``k * E`` leaves in log space,

    p_ie = exp(a_ie + log mu_ie) / sum_{j, l} exp(a_jl + log mu_jl),    w_e = sum_i p_ie,

with ``log 0 = -inf``. Once every branch probability is exactly 0 or 1 each tree reaches one leaf,
so at most k experts have a nonzero weight; before that the gate is dense but differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_int
from .base import Router, Routing
from .smooth_step import (
    check_gamma,
    check_init_scale,
    entropy_rows,
    fp32_linears,
    num_code_bits,
    routing_from_dense,
    smooth_step,
    token_mean,
)


def tree_leaf_probs(s: Tensor, depth: int) -> Tensor:
    """Leaf (path) probabilities of complete binary trees from their node left-probabilities.

    Args:
        s: ``[..., 2^D - 1]`` left-branch probabilities in heap order (node 0 is the root; the
            children of node j are 2j + 1 (left) and 2j + 2 (right)).
        depth: D >= 0.
    Returns:
        ``[..., 2^D]`` leaf probabilities, leaves left to right: the path to leaf l reads the
        bits of l from the most significant, 0 = left. Plain products, so a branch that is
        exactly 0 or 1 gives exact zeros.
    """
    p = s.new_ones(*s.shape[:-1], 1)
    for level in range(depth):
        first = 2**level - 1
        sl = s[..., first : first + 2**level]  # the nodes of this level, left to right
        p = torch.stack([p * sl, p * (1.0 - sl)], dim=-1).flatten(-2)
    return p


def masked_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim where ``-inf`` entries get exactly 0; an all ``-inf`` row gives
    all zeros (instead of NaN)."""
    top = logits.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ex = (logits - top).exp()
    return ex / ex.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


class CometRouter(Router):
    """COMET's tree gate: k soft binary trees, one log-space softmax over all their leaves.

    The pairs are the experts with ``w_e > 0`` exactly; ``rank`` orders a token's kept experts by
    descending weight and ``score`` is the detached weight. When E is not a power of two the
    leaves ``>= E`` name no expert: their logit is ``-inf`` (the softmax renormalises over the real
    leaves). A token whose every tree ends on such leaves has no finite logit and gets no pairs
    (zero MoE output, like a capacity drop); the ``nonexistent_mass`` loss pushes the trees off
    those leaves. E = 1 gives depth-0 trees (a single leaf each): the weight is exactly 1.

    Args:
        d_model: input feature size.
        num_experts: E >= 1.
        k: number of trees, the maximum number of experts per token once the paths are binary,
            in [1, E]. Default 2 (top-2 budget).
        gamma: width of the smooth-step's fractional region, > 0. Default 1.0, as in DSelect-k,
            whose smooth-step COMET's trees reuse; only the ratio of ``w^T x`` to gamma matters.
        init_scale: half-width ``a`` of the uniform init ``U(-a, a)`` of the node weights.
            Default ``gamma / 100``: as in DSelect-k, every node starts deep inside the fractional
            region (nonzero gradients, every leaf reachable, near-uniform leaf distributions).
            *Uncertain*: this follows DSelect-k's init; COMET's text does not pin it down.
        leaf_init_scale: half-width of the uniform init of the leaf weights. Default 0.05
            (small: the softmax over leaves starts near the path distribution). *Uncertain*: the
            same value as DSelect-k's selector-mixing init, not a value read in the COMET paper.
        check_finite: raise ``ValueError`` when a node or leaf logit holds NaN or inf (one sync).

    Parameters: ``node_weight [k * (2^D - 1), d_model]`` (tree-major, heap order within a tree)
    and ``leaf_weight [k * E, d_model]`` (tree-major); no biases, like the other routers.

    Losses (unweighted, ``Routing.losses``):
        ``entropy``: ``sum_i H(mu_i)``, the entropy of each tree's leaf (path) distribution over
            its 2^D leaves, summed over trees, mean over tokens; 0 iff every path is binary.
        ``nonexistent_mass``: ``sum_i sum_{l >= E} mu_il``, mean over tokens; identically 0 when
            E is a power of two.

    ``default_loss_coefs``: ``entropy`` 0.01 (the paper tunes its entropy weight per task; the same
    choice as DSelect-k), ``nonexistent_mass`` 1.0 (same as DSelect-k).

    Extras: ``binary_fraction`` (fraction of the node probabilities exactly 0 or 1) and
    ``empty_fraction`` (fraction of tokens left without any pair).
    """

    default_loss_coefs = {"entropy": 0.01, "nonexistent_mass": 1.0}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        gamma: float = 1.0,
        init_scale: float | None = None,
        leaf_init_scale: float = 0.05,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        check_int("k", k, 1, num_experts)
        self.gamma = check_gamma(gamma)
        self.init_scale = check_init_scale("init_scale", init_scale, self.gamma / 100)
        self.leaf_init_scale = check_init_scale("leaf_init_scale", leaf_init_scale, 0.05)
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.depth = num_code_bits(num_experts)
        self.num_leaves = 2**self.depth
        self.check_finite = bool(check_finite)
        self.node_weight = nn.Parameter(torch.empty(k * (self.num_leaves - 1), d_model))
        self.leaf_weight = nn.Parameter(torch.empty(k * num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.node_weight, -self.init_scale, self.init_scale)
        nn.init.uniform_(self.leaf_weight, -self.leaf_init_scale, self.leaf_init_scale)

    def gate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The dense gate, fp32.

        Args:
            x: ``[N, d_model]``.
        Returns:
            ``(weights [N, E], leaf_probs [N, k, E], paths [N, k, 2^D], s [N, k, 2^D - 1])``:
            the expert weights, the softmax over all k * E leaves, each tree's path
            probabilities and the node left-probabilities.
        """
        n, e = x.shape[0], self.num_experts
        h, a = fp32_linears(x, self.node_weight, self.leaf_weight, check_finite=self.check_finite)
        s = smooth_step(h.view(n, self.k, self.num_leaves - 1), self.gamma)
        paths = tree_leaf_probs(s, self.depth)  # [N, k, 2^D]
        mu = paths[..., :e]  # leaves >= E get -inf: they are not part of the softmax
        reachable = mu > 0
        safe_log = mu.clamp_min(torch.finfo(mu.dtype).tiny).log()
        logits = torch.where(
            reachable, a.view(n, self.k, e) + safe_log, torch.full_like(mu, float("-inf"))
        )
        leaf_probs = masked_softmax(logits.reshape(n, self.k * e)).view(n, self.k, e)
        # elementwise sum over trees: exact zeros stay exact
        return leaf_probs.sum(dim=1), leaf_probs, paths, s

    def forward(self, x: Tensor, **kwargs) -> Routing:
        weights, _, paths, s = self.gate(x)
        routing = routing_from_dense(weights)
        routing.losses.update(
            {
                "entropy": token_mean(entropy_rows(paths).sum(dim=-1)),
                "nonexistent_mass": token_mean(paths[..., self.num_experts :].sum(dim=(-1, -2))),
            }
        )
        with torch.no_grad():
            binary = (s == 0) | (s == 1)
            routing.extras["binary_fraction"] = (
                binary.float().mean() if binary.numel() else weights.new_ones(())
            )
            empty = (weights == 0).all(dim=-1).float()
            routing.extras["empty_fraction"] = token_mean(empty)
        return routing

    def extra_repr(self) -> str:
        return f"k={self.k}, gamma={self.gamma}, depth={self.depth}"
