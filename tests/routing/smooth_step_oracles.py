"""Independent references of the smooth-step gates (DSelect-k, COMET), shared by their tests.

The oracles recompute each token's gate from the router's parameters with plain Python loops over
selectors / trees, bits / tree levels and experts, using the literal smooth-step formula of the
issue (sharing no code with ``xmoe.routing``).
"""

from __future__ import annotations

import torch

from xmoe.routing.comet import CometRouter
from xmoe.routing.dselect import DSelectKRouter


def ref_s(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The issue's smooth-step on one scalar tensor, branching in Python."""
    v = float(t.detach())
    if v <= -gamma / 2:
        return torch.zeros(())
    if v >= gamma / 2:
        return torch.ones(())
    return -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5


def ref_dselect(router: DSelectKRouter, x: torch.Tensor, with_selectors: bool = False):
    """Per token: ``{code: weight}`` over all 2^m codes (codes >= E included), differentiable;
    with ``with_selectors`` also each selector's list of code weights.

    Parameter layout read from the router: ``z_weight`` rows ``i*m + b`` are bit b of selector i,
    ``alpha_weight`` row i is selector i's mixing logit.
    """
    k, m, gamma = router.k, router.num_bits, router.gamma
    out = []
    for t in range(x.shape[0]):
        z = router.z_weight.float() @ x[t].float()
        mix = torch.softmax(router.alpha_weight.float() @ x[t].float(), dim=0)
        selectors = []
        for i in range(k):
            row = []
            for c in range(2**m):
                r = torch.ones(())
                for b in range(m):
                    s = ref_s(z[i * m + b], gamma)
                    r = r * (s if (c >> b) & 1 else 1 - s)
                row.append(r)
            selectors.append(row)
        codes = {c: sum(mix[i] * selectors[i][c] for i in range(k)) for c in range(2**m)}
        out.append((codes, selectors) if with_selectors else codes)
    return out


def ref_comet(router: CometRouter, x: torch.Tensor):
    """Per token: ``({expert: weight}, {(tree, leaf): path prob})``, differentiable.

    ``node_weight`` row ``i*(2^D - 1) + j`` is node j (heap order: children of j are 2j+1 left,
    2j+2 right) of tree i; ``leaf_weight`` row ``i*E + e`` is leaf e of tree i. A token goes left
    with probability S(w^T x); leaf l's path reads the bits of l from the top, 0 = left.
    """
    k, e_num, depth, gamma = router.k, router.num_experts, router.depth, router.gamma
    nodes = 2**depth - 1
    out = []
    for t in range(x.shape[0]):
        h = router.node_weight.float() @ x[t].float()
        a = router.leaf_weight.float() @ x[t].float()
        paths, entries = {}, []
        for i in range(k):
            for leaf in range(2**depth):
                path, j = torch.ones(()), 0
                for level in range(depth):
                    bit = (leaf >> (depth - 1 - level)) & 1
                    s = ref_s(h[i * nodes + j], gamma)
                    path = path * (1 - s if bit else s)
                    j = 2 * j + 1 + bit
                paths[(i, leaf)] = path
                if leaf < e_num and float(path.detach()) > 0:
                    entries.append((leaf, a[i * e_num + leaf] + torch.log(path)))
        weights = {}
        if entries:
            p = torch.softmax(torch.stack([v for _, v in entries]), dim=0)
            for (leaf, _), pv in zip(entries, p.unbind(0), strict=True):
                weights[leaf] = weights.get(leaf, torch.zeros(())) + pv
        out.append((weights, paths))
    return out


def ref_expert_weights(router, x):
    """Per token ``{expert: weight}`` for experts < E, from the matching oracle."""
    if isinstance(router, DSelectKRouter):
        return [
            {e: w for e, w in c.items() if e < router.num_experts} for c in ref_dselect(router, x)
        ]
    return [w for w, _ in ref_comet(router, x)]


def dense_from_routing(routing) -> torch.Tensor:
    w = torch.zeros(routing.num_tokens, routing.num_experts)
    return w.index_put((routing.token_idx, routing.expert_idx), routing.weight.detach())


ROUTER_CLASSES = {"dselect": DSelectKRouter, "comet": CometRouter}


def big_params(router, scale: float) -> None:
    """Redraw the bit / node weights so most smooth-steps saturate (a partly sparse gate)."""
    with torch.no_grad():
        w = router.z_weight if isinstance(router, DSelectKRouter) else router.node_weight
        w.uniform_(-scale, scale)
