"""Every zoo router, through the MoE layer, against a brute-force per-pair loop oracle.

For each router the oracle recomputes the routing decision *and* the combine weights from the
router's own parameters with plain Python loops (sharing no code with ``xmoe.routing``), applies
the capacity policy with explicit per-expert sorting, and runs every kept pair through
:func:`conftest.loop_oracle`. Outputs must match to 1e-5 and so must the gradients w.r.t. ``x``,
the router weight (and ``noise_weight``) and every expert parameter.

Stochastic routers (GShard's random routing, noisy top-k) are replayed: the layer is called right
after ``torch.manual_seed(SEED)`` and the oracle redraws the same numbers from the same seed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    D_EXPERT,
    D_MODEL,
    NUM_EXPERTS,
    assert_grads_match,
    expert_params,
    loop_oracle,
    make_moe,
    pair_set,
)
from xmoe import MoE, Routing
from xmoe.routing import ROUTERS

N_TOKENS = 24
SEED = 4321
VOCAB = 50
NUM_NULL = 2
# A loss-free-balancing bias large enough to reorder experts against the probabilities.
LOSS_FREE_BIAS = torch.tensor([0.25, -0.2, 0.1, -0.05])


# --------------------------------------------------------------------------------------------
# Independent references: each returns candidate pairs {(t, e): (rank, score)} before capacity
# and a differentiable weight function weight(t, e).
# --------------------------------------------------------------------------------------------


def _order(row: list[float]) -> list[int]:
    """Indices by descending score, ties to the lower index (a stable descending sort)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def ref_preference(probs, order_scores, keep_rule, renormalize, num_real):
    """Rank each token's outputs by ``order_scores``, keep ranks by ``keep_rule`` on the
    probabilities in that order, drop null outputs (index >= num_real)."""
    cands, weight_fns = {}, {}
    p = probs.detach().double().tolist()
    s = order_scores.detach().double().tolist()
    for t in range(probs.shape[0]):
        order = _order(s[t])
        kept_ranks = keep_rule([p[t][e] for e in order])
        kept = [(r, order[r]) for r in kept_ranks]
        denom = sum(probs[t, e] for _, e in kept) if renormalize else None
        for r, e in kept:
            if e >= num_real:
                continue
            cands[(t, e)] = (r, p[t][e])
            weight_fns[(t, e)] = lambda t=t, e=e, d=denom: (
                probs[t, e] if d is None else probs[t, e] / d
            )
    return cands, weight_fns


def threshold_rule(t, max_experts=None):
    def rule(ranked):
        kept, before = [], 0.0
        for r, v in enumerate(ranked):
            if max_experts is not None and r >= max_experts:
                break
            if t >= 1.0 or before < t:
                kept.append(r)
            before += v
        return kept

    return rule


def topk_rule(k):
    return lambda ranked: list(range(k))


def reference_routing(moe, x, token_ids=None, bias=None):
    """``(candidates, weight_fns)`` for ``moe.router`` on ``x``; ``moe`` must have just been
    called right after ``torch.manual_seed(SEED)`` (for the stochastic routers). ``bias`` is the
    loss-free-balancing bias the forward used (before its own update)."""
    router = moe.router
    name = router.__class__.__name__
    n, num_e = x.shape[0], moe.num_experts
    training = moe.training

    if name == "HashRouter":
        table = router.table.tolist()
        cands = {(t, table[i]): (0, 1.0) for t, i in enumerate(token_ids.tolist())}
        return cands, {k: (lambda: torch.ones(())) for k in cands}

    logits = x.float() @ router.weight.float().T  # [N, E (+Z)], differentiable

    if name == "NoisyTopKRouter":
        h = logits
        if training:
            torch.manual_seed(SEED)
            eps = torch.randn(n, num_e)
            std = F.softplus(x.float() @ router.noise_weight.float().T) + router.noise_epsilon
            h = logits + eps * std
        hd = h.detach().double().tolist()
        cands, fns = {}, {}
        for t in range(n):
            top = _order(hd[t])[: router.k]
            gates = torch.softmax(torch.stack([h[t, e] for e in top]), 0)
            for r, e in enumerate(top):
                cands[(t, e)] = (r, float(gates[r].detach()))
                fns[(t, e)] = lambda g=gates, r=r: g[r]
        return cands, fns

    if name == "BalancedAssignmentRouter":
        ld = logits.detach().double()
        if training:
            expert = _optimal_balanced_assignment(ld)
        else:
            expert = [_order(row)[0] for row in ld.tolist()]
        cands, fns = {}, {}
        for t, e in enumerate(expert):
            rank = sum(1 for v in ld[t].tolist() if v > ld[t, e].item())
            cands[(t, e)] = (rank, 1 / (1 + math.exp(-ld[t, e].item())))
            fns[(t, e)] = lambda t=t, e=e: torch.sigmoid(logits[t, e])
        return cands, fns

    probs = torch.softmax(logits, dim=-1)

    if name == "ExpertChoiceRouter":
        quota = min(n, math.ceil(router.expert_capacity * n / num_e))
        p = probs.detach().double().tolist()
        cands, fns = {}, {}
        for e in range(num_e):
            col = [p[t][e] for t in range(n)]
            for t in _order(col)[:quota]:
                cands[(t, e)] = (_order(p[t]).index(e), p[t][e])
                fns[(t, e)] = lambda t=t, e=e: probs[t, e]
        return cands, fns

    # Preference routers: threshold / top-k / Switch / GShard (+ null experts, loss-free bias).
    order_scores = probs
    if bias is not None:
        order_scores = probs.detach() + torch.cat([bias, torch.zeros(router.num_null_experts)])
    if name == "ThresholdRouter":
        rule = threshold_rule(router.threshold, router.max_experts)
    else:
        rule = topk_rule(router.k)
    cands, fns = ref_preference(probs, order_scores, rule, router.renormalize, num_e)

    if name == "GShardRouter" and training and router.random_routing:
        # Replay the draw: one uniform per top-2 pair, token-major / rank-minor.
        torch.manual_seed(SEED)
        draw = torch.rand(2 * n).tolist()
        for (t, e), (r, _) in list(cands.items()):
            g2 = float(fns[(t, e)]().detach())
            if r == 1 and not draw[2 * t + 1] < 2 * g2:
                del cands[(t, e)]
    return cands, fns


def _optimal_balanced_assignment(scores):
    """Exact max-score assignment with floor/ceil(N/E) tokens per expert (scipy on slots that
    are built here independently: every expert gets floor(N/E) slots, plus one optional slot
    that costs a large penalty so only N mod E of them are used)."""
    from scipy.optimize import linear_sum_assignment

    n, e = scores.shape
    floor, rem = divmod(n, e)
    cols, penalty = [], []
    for ex in range(e):
        cols += [ex] * floor
        penalty += [0.0] * floor
        if rem:
            cols.append(ex)
            penalty.append(1e6)
    cost = -scores[:, cols].numpy() + torch.tensor(penalty, dtype=torch.float64).numpy()
    rows, slots = linear_sum_assignment(cost)
    out = [0] * n
    for r, s in zip(rows.tolist(), slots.tolist(), strict=True):
        out[r] = cols[s]
    return out


def reference_keep(cands, capacity, num_experts):
    """Capacity policy by explicit sorting: each expert admits its best (rank, -score, token)."""
    if capacity is None:
        return set(cands)
    kept = set()
    for e in range(num_experts):
        items = sorted((r, -s, t) for (t, ee), (r, s) in cands.items() if ee == e)
        kept.update((t, e) for _, _, t in items[:capacity])
    return kept


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def check_against_oracle(moe, x, token_ids=None, atol=1e-5):
    router = moe.router
    x = x.clone().requires_grad_(True)
    kwargs = {} if token_ids is None else {"token_ids": token_ids}
    bias = None
    if getattr(router, "loss_free_balance", False):
        bias = router.selection_bias.clone()

    torch.manual_seed(SEED)
    y = moe(x, **kwargs)
    routing = moe.last_routing
    assert isinstance(routing, Routing) and y.shape == x.shape

    cands, weight_fns = reference_routing(moe, x, token_ids, bias)
    cf = moe.capacity_factor if moe.training else moe.eval_capacity_factor
    capacity = None if cf is None else math.ceil(cf * x.shape[0] / moe.num_experts)
    expected = reference_keep(cands, capacity, moe.num_experts)

    # -- routing decisions ---------------------------------------------------------------------
    assert pair_set(routing) == expected
    assert routing.num_pairs == len(expected)  # no duplicates
    assert int(routing.expert_idx.max()) < moe.num_experts
    assert routing.num_selected == len(cands)
    if capacity is not None:
        assert int(routing.expert_counts.max()) <= capacity

    # -- forward: weights recomputed from the router parameters --------------------------------
    pairs = list(zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True))
    if pairs:
        weights = torch.stack([weight_fns[p]().float().reshape(()) for p in pairs])
    else:
        weights = torch.zeros(0)
    torch.testing.assert_close(routing.weight, weights, atol=1e-6, rtol=0)
    y_ref = loop_oracle(x, routing.token_idx, routing.expert_idx, weights, moe.experts)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)

    # -- backward -------------------------------------------------------------------------------
    params = {"x": x}
    if hasattr(router, "weight"):
        params["router.weight"] = router.weight
    if hasattr(router, "noise_weight"):
        params["router.noise_weight"] = router.noise_weight
    params.update({f"experts.{k}": v for k, v in expert_params(moe).items()})
    grads = assert_grads_match(y, y_ref, params, atol)
    if "router.weight" in grads:
        assert grads["router.weight"].abs().sum() > 0  # the router check is not vacuous
    if "router.noise_weight" in grads and moe.training:
        assert grads["router.noise_weight"].abs().sum() > 0  # noise enters the weights
    return routing, cands


# --------------------------------------------------------------------------------------------
# Parametrisation: every registered router, train and eval, three capacities, both backends
# --------------------------------------------------------------------------------------------

CASES = {
    "switch-train": (dict(router="switch"), True),
    "switch-eval": (dict(router="switch"), False),
    "gshard-train": (dict(router="gshard"), True),
    "gshard-eval": (dict(router="gshard"), False),
    "noisy_topk-train": (dict(router="noisy_topk", k=2), True),
    "noisy_topk-eval": (dict(router="noisy_topk", k=2), False),
    "expert_choice-train": (dict(router="expert_choice"), True),
    "expert_choice-eval": (dict(router="expert_choice", expert_capacity=1.5), False),
    "hash-train": (dict(router="hash", vocab_size=VOCAB), True),
    "hash-eval": (dict(router="hash", vocab_size=VOCAB, balance="frequency"), False),
    "base-train": (dict(router="base"), True),
    "base-eval": (dict(router="base"), False),
    "threshold+null-train": (dict(router="threshold", threshold=0.8, num_null_experts=2), True),
    "threshold+null-renorm-eval": (
        dict(router="threshold", threshold=0.8, num_null_experts=NUM_NULL, renormalize=True),
        False,
    ),
    "topk+null-renorm-train": (
        dict(router="topk", k=2, num_null_experts=NUM_NULL, renormalize=True),
        True,
    ),
    "threshold+loss_free-train": (
        dict(router="threshold", threshold=0.7, loss_free_balance=True),
        True,
    ),
    "threshold+loss_free-eval": (
        dict(router="threshold", threshold=0.7, loss_free_balance=True),
        False,
    ),
    "topk+loss_free-train": (dict(router="topk", k=2, loss_free_balance=True), True),
    "topk+null+loss_free-train": (
        dict(router="topk", k=2, num_null_experts=NUM_NULL, loss_free_balance=True),
        True,
    ),
}
CAPACITIES = {"dropless": "dropless", "cf0.5": 0.5, "cf2.0": 2.0}


ZOO = {"threshold", "topk", "switch", "gshard", "noisy_topk", "expert_choice", "hash", "base"}


def test_cases_cover_every_zoo_router():
    assert set(ROUTERS) >= ZOO
    assert {cfg["router"] for cfg, _ in CASES.values()} >= ZOO


def build(cfg, training, cf, backend):
    cfg = dict(cfg)
    if cfg["router"] == "expert_choice":
        with pytest.warns(UserWarning, match="leak"):
            moe = make_moe(capacity_factor=cf, eval_capacity_factor=cf, backend=backend, **cfg)
    elif cfg["router"] == "hash":
        # the hash router has no weight, so no init_std (make_moe would add one)
        kw = dict(d_model=D_MODEL, num_experts=NUM_EXPERTS, d_expert=D_EXPERT)
        moe = MoE(**kw, capacity_factor=cf, eval_capacity_factor=cf, backend=backend, **cfg)
    else:
        moe = make_moe(capacity_factor=cf, eval_capacity_factor=cf, backend=backend, **cfg)
    if getattr(moe.router, "loss_free_balance", False):
        moe.router.selection_bias.copy_(LOSS_FREE_BIAS)
    return moe.train(training)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment", "native"])
@pytest.mark.parametrize("cf", list(CAPACITIES.values()), ids=list(CAPACITIES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_router_output_and_grads_match_loop_oracle(case, cf, backend):
    cfg, training = CASES[case]
    moe = build(cfg, training, cf, backend)
    x = torch.randn(N_TOKENS, D_MODEL)
    token_ids = None
    if cfg["router"] == "hash":
        token_ids = torch.randint(0, VOCAB, (N_TOKENS,))
        if cfg.get("balance") == "frequency":
            moe.router.fit_frequencies(torch.randint(1, 1000, (VOCAB,)))
    routing, cands = check_against_oracle(moe, x, token_ids)
    if cf == 0.5:
        assert routing.dropped_fraction > 0  # cf=0.5 really exercises drops for every router
    if cf == "dropless":
        assert routing.dropped_fraction == 0.0


def test_gshard_training_oracle_really_drops_some_second_experts():
    moe = build(dict(router="gshard"), True, "dropless", "loop")
    routing, _ = check_against_oracle(moe, torch.randn(64, D_MODEL))
    seconds = int((routing.rank == 1).sum())
    assert 0 < seconds < 64


def test_noisy_topk_training_oracle_routes_on_noisy_logits():
    # The replayed noise matters: the clean top-2 differs from the chosen pairs for some token.
    moe = build(dict(router="noisy_topk", k=2), True, "dropless", "loop")
    x = torch.randn(64, D_MODEL)
    routing, _ = check_against_oracle(moe, x)
    clean = (x @ moe.router.weight.detach().T).topk(2, dim=-1).indices
    clean_pairs = {(t, int(e)) for t in range(64) for e in clean[t]}
    assert pair_set(routing) != clean_pairs


def test_loss_free_bias_really_reorders_experts_in_oracle_cases():
    # Guard: with LOSS_FREE_BIAS the biased top-1 differs from the probability top-1 somewhere.
    moe = build(dict(router="topk", k=1, loss_free_balance=True), True, "dropless", "loop")
    x = torch.randn(N_TOKENS, D_MODEL)
    routing, _ = check_against_oracle(moe, x)
    unbiased = (x @ moe.router.weight.detach().T).argmax(-1)
    chosen = torch.empty_like(unbiased)
    chosen[routing.token_idx] = routing.expert_idx
    assert (chosen != unbiased).any()


def test_null_experts_oracle_cases_really_select_nulls():
    moe = build(
        dict(router="threshold", threshold=0.8, num_null_experts=NUM_NULL), True, "dropless", "loop"
    )
    routing, _ = check_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))
    assert float(routing.extras["null_fraction"]) > 0
    assert moe.router.weight.shape == (NUM_EXPERTS + NUM_NULL, D_MODEL)
