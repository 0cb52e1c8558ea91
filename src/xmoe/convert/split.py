"""Splitting an FFN's ``d_ff`` neurons into E equal experts.

- ``random``: a seeded random permutation, cut into E slices (the baseline).
- ``params``: balanced k-means on the neurons' input weight vectors (MoEfication's parameter
  clustering): neurons whose first-layer rows point the same way share an expert.
- ``coact``: balanced k-means on the neurons' activation patterns over calibration tokens
  (cosine of the activation vectors = co-activation weighted by magnitude): neurons that fire
  together share an expert, so a token's activation mass concentrates in few experts.

Balanced k-means: spherical k-means whose assignment step is an exact balanced assignment
(each cluster gets exactly ``d_ff / E`` neurons), solved with the Hungarian algorithm on the
cost matrix with each centroid repeated ``d_ff / E`` times.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ffn import DenseFFN, check_num_experts

SPLITS = ("coact", "params", "random")
KMEANS_ITERS = 12  # balanced k-means rarely moves after ~10 iterations on these sizes
COACT_MAX_TOKENS = (
    8192  # tokens whose activations describe a neuron (more costs time, not much else)
)


def split_neurons(
    method: str,
    dense: DenseFFN,
    num_experts: int,
    acts: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Partition the neurons of ``dense`` into ``num_experts`` equal groups.

    Args:
        method: one of :data:`SPLITS`.
        dense: the FFN.
        num_experts: E; must divide ``d_ff``.
        acts: ``[N, d_ff]`` calibration activations (needed by ``coact``).
        seed: seeds the permutation / the k-means initialisation.
    Returns:
        ``[E, d_ff / E]`` int64 neuron indices, each group sorted, groups in a fixed order.
    """
    if method not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {method!r}")
    check_num_experts(num_experts, dense.d_ff)
    gen = torch.Generator().manual_seed(seed)
    if method == "random":
        groups = torch.randperm(dense.d_ff, generator=gen).view(num_experts, -1)
        return groups.sort(dim=-1).values
    if method == "params":
        feats = dense.w1 if not dense.gated else torch.cat([dense.w1, dense.w3], dim=1)
    else:
        if acts is None:
            raise ValueError("split='coact' needs calibration activations")
        if acts.shape[0] > COACT_MAX_TOKENS:
            rows = torch.randperm(acts.shape[0], generator=gen)[:COACT_MAX_TOKENS]
            acts = acts[rows]
        feats = acts.T
    labels = balanced_kmeans(feats.float(), num_experts, gen)
    return groups_from_labels(labels, num_experts)


def balanced_kmeans(
    feats: Tensor, k: int, gen: torch.Generator, iters: int = KMEANS_ITERS
) -> Tensor:
    """Spherical k-means with equal cluster sizes. ``feats: [n, f]`` → labels ``[n]``."""
    from scipy.optimize import linear_sum_assignment

    n = feats.shape[0]
    cap = n // k
    x = F.normalize(feats, dim=1)
    centroids = x[torch.randperm(n, generator=gen)[:k]]
    labels = None
    for _ in range(iters):
        cost = -(x @ centroids.T).double().numpy()  # [n, k]
        rows, cols = linear_sum_assignment(np.repeat(cost, cap, axis=1))
        new = torch.empty(n, dtype=torch.long)
        new[torch.from_numpy(rows)] = torch.from_numpy(cols // cap)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros(k, x.shape[1]).index_add_(0, labels, x)
        centroids = F.normalize(sums, dim=1)
    return labels


def groups_from_labels(labels: Tensor, k: int) -> Tensor:
    """Labels ``[n]`` with ``n / k`` per label → ``[k, n / k]`` sorted neuron indices."""
    order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))
    return order.view(k, -1)
