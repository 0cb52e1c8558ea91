"""The MoE layer against a brute-force per-pair loop oracle: outputs, gradients, capacity policy."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    D_MODEL,
    NUM_EXPERTS,
    assert_grads_match,
    capacity_for,
    expert_params,
    loop_oracle,
    make_moe,
    oracle_pair_weights,
    pair_set,
    reference_capacity,
    reference_selection,
    router_probs,
)
from xmoe import Routing, apply_capacity, expert_capacity

N_TOKENS = 24
NOISE_SEED = 4321

ROUTERS = {
    "threshold-0.7": dict(router="threshold", threshold=0.7),
    "threshold-1.0": dict(router="threshold", threshold=1.0),
    "threshold-0.7-renorm": dict(router="threshold", threshold=0.7, renormalize=True),
    "threshold-0.9-max2-renorm": dict(
        router="threshold", threshold=0.9, max_experts=2, renormalize=True
    ),
    "topk-1": dict(router="topk", k=1),
    "topk-2-renorm": dict(router="topk", k=2, renormalize=True),
    "topk-2-noisy": dict(router="topk", k=2, noisy=True),
}
CAPACITIES = {"dropless": None, "cf0.5": 0.5, "cf2.0": 2.0}


def _check_layer_against_oracle(moe, x, atol=1e-5):
    """Forward + backward through the layer and through the oracle; compare everything."""
    router = moe.router
    noisy = getattr(router, "noisy", False) and moe.training
    x = x.clone().requires_grad_(True)

    torch.manual_seed(NOISE_SEED)
    y = moe(x)
    routing = moe.last_routing
    assert isinstance(routing, Routing)
    assert y.shape == x.shape

    noise_eps = None
    if noisy:
        # The router draws eps = randn_like(logits) once per call; replay the same draw.
        torch.manual_seed(NOISE_SEED)
        noise_eps = torch.randn(x.shape[0], moe.num_experts)

    # -- routing decisions, checked against independent references -------------------------
    probs = router_probs(x, router, noise_eps)
    selection = reference_selection(probs, router)
    n = x.shape[0]
    cf = moe.capacity_factor if moe.training else moe.eval_capacity_factor
    capacity = capacity_for(cf, n, moe.num_experts)
    expected_pairs = reference_capacity(selection, probs, capacity, moe.num_experts)
    assert pair_set(routing) == expected_pairs
    assert routing.num_pairs == len(expected_pairs)  # no duplicate pairs
    assert routing.num_selected == sum(len(s) for s in selection)
    if capacity is not None:
        assert int(routing.expert_counts.max()) <= capacity

    # -- forward -----------------------------------------------------------------------------
    weights = oracle_pair_weights(
        probs, selection, routing.token_idx, routing.expert_idx, router.renormalize
    )
    torch.testing.assert_close(routing.weight, weights, atol=1e-6, rtol=0)
    y_ref = loop_oracle(x, routing.token_idx, routing.expert_idx, weights, moe.experts)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)

    # -- backward: same parameter tensors, independent graph ---------------------------------
    params = {"x": x, "router.weight": router.weight}
    if noisy:
        params["router.noise_weight"] = router.noise_weight
    params.update({f"experts.{k}": v for k, v in expert_params(moe).items()})
    grads = assert_grads_match(y, y_ref, params, atol)
    # the check is not vacuous: the router weight does receive gradient
    assert grads["router.weight"].abs().sum() > 0
    return routing


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment", "native"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cf", list(CAPACITIES.values()), ids=list(CAPACITIES))
@pytest.mark.parametrize("router_cfg", list(ROUTERS.values()), ids=list(ROUTERS))
def test_layer_output_and_grads_match_loop_oracle(router_cfg, cf, bias, backend):
    moe = make_moe(capacity_factor=cf, bias=bias, backend=backend, **router_cfg)
    moe.train()
    x = torch.randn(N_TOKENS, D_MODEL)
    routing = _check_layer_against_oracle(moe, x)
    if cf == 0.5:
        assert routing.dropped_fraction > 0  # cf=0.5 must actually exercise drops


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "segment", "native"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize(
    "router_cfg",
    [ROUTERS["threshold-0.7"], ROUTERS["topk-2-renorm"]],
    ids=["threshold-0.7", "topk-2-renorm"],
)
def test_activation_variants_match_loop_oracle(activation, router_cfg, backend):
    moe = make_moe(activation=activation, capacity_factor=1.0, backend=backend, **router_cfg)
    moe.train()
    _check_layer_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))


@pytest.mark.parametrize("router_cfg", list(ROUTERS.values()), ids=list(ROUTERS))
def test_eval_mode_dropless_matches_oracle_even_with_training_capacity(router_cfg):
    # capacity_factor only applies in training; eval default is dropless (and noise is off).
    moe = make_moe(capacity_factor=0.25, **router_cfg)
    moe.eval()
    routing = _check_layer_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))
    assert routing.dropped_fraction == 0.0


def test_eval_capacity_factor_applies_in_eval_mode():
    moe = make_moe(router="threshold", threshold=1.0, eval_capacity_factor=0.5)
    moe.eval()
    routing = _check_layer_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))
    assert int(routing.expert_counts.max()) <= expert_capacity(0.5, N_TOKENS, NUM_EXPERTS)
    assert routing.dropped_fraction > 0


def test_swiglu_without_bias_and_auto_backend_match_oracle():
    moe = make_moe(activation="swiglu", bias=False, backend="auto", router="topk", k=2)
    _check_layer_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))


def test_noisy_topk_selection_differs_from_clean_selection_in_training():
    # Guard that the noisy configuration above really routes on noisy logits.
    moe = make_moe(router="topk", k=1, noisy=True)
    moe.train()
    x = torch.randn(256, D_MODEL)
    moe(x)
    clean = router_probs(x, moe.router).argmax(-1)
    chosen = torch.empty_like(clean)
    chosen[moe.last_routing.token_idx] = moe.last_routing.expert_idx
    assert (chosen != clean).any()
    moe.eval()
    moe(x)
    chosen[moe.last_routing.token_idx] = moe.last_routing.expert_idx
    assert torch.equal(chosen, clean)


# --------------------------------------------------------------------------------------------
# Capacity policy in isolation
# --------------------------------------------------------------------------------------------


def _random_routing(num_tokens, num_experts, pairs_per_token, gen):
    """A Routing with random ranks/scores; each token picks distinct experts."""
    tok, exp, rank, score = [], [], [], []
    for t in range(num_tokens):
        k = int(torch.randint(1, pairs_per_token + 1, (1,), generator=gen))
        experts = torch.randperm(num_experts, generator=gen)[:k].tolist()
        s = sorted(torch.rand(k, generator=gen).tolist(), reverse=True)
        for r, (e, sc) in enumerate(zip(experts, s, strict=True)):
            tok.append(t)
            exp.append(e)
            rank.append(r)
            score.append(sc)
    # shuffle pair order so the policy cannot rely on the token-major layout
    perm = torch.randperm(len(tok), generator=gen)
    as_t = lambda v, dt: torch.tensor(v, dtype=dt)[perm]
    return Routing(
        token_idx=as_t(tok, torch.int64),
        expert_idx=as_t(exp, torch.int64),
        weight=as_t(score, torch.float32),
        rank=as_t(rank, torch.int64),
        score=as_t(score, torch.float32),
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


def _reference_apply_capacity(routing, capacity):
    kept = set()
    pairs = list(
        zip(
            routing.token_idx.tolist(),
            routing.expert_idx.tolist(),
            routing.rank.tolist(),
            routing.score.tolist(),
            strict=True,
        )
    )
    for e in range(routing.num_experts):
        cands = sorted((r, -s, t) for t, ee, r, s in pairs if ee == e)
        kept.update((t, e) for _, _, t in cands[:capacity])
    return kept


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_capacity_keeps_top_c_by_rank_score_token(capacity, seed):
    gen = torch.Generator().manual_seed(seed)
    routing = _random_routing(20, 5, 4, gen)
    kept = apply_capacity(routing, capacity)
    assert pair_set(kept) == _reference_apply_capacity(routing, capacity)
    assert kept.num_selected == routing.num_pairs
    # kept pairs carry their own weights/ranks/scores along
    original = {
        (t, e): (w, r)
        for t, e, w, r in zip(
            routing.token_idx.tolist(),
            routing.expert_idx.tolist(),
            routing.weight.tolist(),
            routing.rank.tolist(),
            strict=True,
        )
    }
    for t, e, w, r in zip(
        kept.token_idx.tolist(),
        kept.expert_idx.tolist(),
        kept.weight.tolist(),
        kept.rank.tolist(),
        strict=True,
    ):
        assert original[(t, e)] == (w, r)


def test_apply_capacity_breaks_score_ties_by_lower_token_index():
    # five tokens, same expert, same rank, same score: capacity 2 keeps tokens 0 and 1.
    routing = Routing(
        token_idx=torch.tensor([4, 2, 0, 3, 1]),
        expert_idx=torch.zeros(5, dtype=torch.int64),
        weight=torch.full((5,), 0.5),
        rank=torch.zeros(5, dtype=torch.int64),
        score=torch.full((5,), 0.5),
        num_tokens=5,
        num_experts=2,
    )
    assert sorted(apply_capacity(routing, 2).token_idx.tolist()) == [0, 1]


def test_apply_capacity_prefers_lower_rank_over_higher_score():
    # token 0 has expert 0 as its 2nd choice with score 0.45; token 1 has it as 1st with 0.4.
    routing = Routing(
        token_idx=torch.tensor([0, 1]),
        expert_idx=torch.tensor([0, 0]),
        weight=torch.tensor([0.45, 0.4]),
        rank=torch.tensor([1, 0]),
        score=torch.tensor([0.45, 0.4]),
        num_tokens=2,
        num_experts=2,
    )
    assert apply_capacity(routing, 1).token_idx.tolist() == [1]


@pytest.mark.parametrize(
    ("cf", "n", "e", "expected"),
    [(1.0, 24, 4, 6), (0.5, 24, 4, 3), (1.25, 10, 4, 4), (2.0, 1, 8, 1), (0.01, 5, 4, 1)],
)
def test_expert_capacity_is_ceil_cf_n_over_e(cf, n, e, expected):
    assert expert_capacity(cf, n, e) == expected


def test_layer_matches_oracle_with_many_experts_and_d_expert_not_aligned():
    # E=7, d_expert=6 (loop backend): unusual sizes still match the oracle.
    moe = make_moe(num_experts=7, d_expert=6, router="threshold", threshold=0.8)
    moe.train()
    _check_layer_against_oracle(moe, torch.randn(N_TOKENS, D_MODEL))
