"""ScoredRouter: every selection rule against a per-token loop oracle, outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmoe.routing import ROUTERS, ScoredRouter, ThresholdRouter, make_router


def oracle(router: ScoredRouter, x: torch.Tensor) -> list[dict[int, torch.Tensor]]:
    """Per token: {expert: combine weight}, computed with plain Python loops."""
    logits = x.float() @ router.weight.float().T
    out = []
    E = router.num_experts
    bias = router.selection_bias.tolist() if router.has_bias else [0.0] * E
    for i in range(x.shape[0]):
        row = logits[i]
        if router.score == "softmax":
            m = max(row.tolist())
            ex = [torch.exp(row[e] - m) for e in range(E)]
            tot = sum(ex)
            s = [v / tot for v in ex]
        else:
            s = [1 / (1 + torch.exp(-row[e])) for e in range(E)]
        choice = [float(s[e].detach()) + bias[e] for e in range(E)]
        size = E // router.num_groups
        eligible = set(range(E))
        if router.topk_groups < router.num_groups:
            gscore = []
            for g in range(router.num_groups):
                vals = sorted(choice[g * size : (g + 1) * size], reverse=True)
                gscore.append(sum(vals[:2]))
            best = sorted(range(router.num_groups), key=lambda g: -gscore[g])[: router.topk_groups]
            eligible = {e for g in best for e in range(g * size, (g + 1) * size)}
        ranked = sorted(eligible, key=lambda e: (-choice[e], e))
        if router.candidates is not None and router.selection != "topk":
            ranked = ranked[: router.candidates]
            eligible = set(ranked)
        plain = router.score == "softmax" and not router.has_bias and len(eligible) == E
        if plain:
            share = {e: float(s[e].detach()) for e in ranked}
        else:
            pos = {e: max(choice[e], 0.0) for e in ranked}
            tot = sum(pos.values())
            share = {e: (pos[e] / tot if tot > 0 else 1 / len(ranked)) for e in ranked}
        if router.selection == "topk":
            kept = ranked[: router.k]
        elif router.selection == "threshold":
            kept, mass = [], 0.0
            for e in ranked:
                if mass < router.threshold or router.threshold >= 1:
                    kept.append(e)
                mass += share[e]
            if router.max_experts is not None:
                kept = kept[: router.max_experts]
        else:
            ent = -sum(p * math.log(p) for p in share.values() if p > 0)
            h = ent / math.log(max(len(ranked), 2))
            k = min(1 + sum(h > c for c in router.entropy_cutoffs), E)
            if router.max_experts is not None:
                k = min(k, router.max_experts)
            kept = ranked[:k]
        w = {e: s[e] for e in kept}
        if router.normalize:
            tot = sum(w.values())
            w = {e: v / tot for e, v in w.items()}
        out.append({e: v * router.scaling for e, v in w.items()})
    return out


def as_dicts(routing) -> list[dict[int, torch.Tensor]]:
    out: list[dict[int, torch.Tensor]] = [{} for _ in range(routing.num_tokens)]
    for t, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight):
        out[t][e] = w
    return out


def check_against_oracle(router: ScoredRouter, x: torch.Tensor) -> None:
    got, want = as_dicts(router(x)), oracle(router, x)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for e in g:
            assert abs(float(g[e].detach()) - float(w[e].detach())) < 1e-5


configs = st.fixed_dictionaries(
    {
        "score": st.sampled_from(["softmax", "sigmoid"]),
        "selection": st.sampled_from(["topk", "threshold", "entropy_k"]),
        "normalize": st.booleans(),
        "groups": st.sampled_from([(1, 1), (4, 2), (2, 1), (4, 4)]),
        "bias": st.booleans(),
        "k": st.integers(1, 2),
        "threshold": st.sampled_from([0.3, 0.5, 0.8, 0.95, 1.0]),
        "cutoffs": st.sampled_from(
            [(0.5,), (0.2, 0.6, 0.9), (0.99,), tuple(i / 10 for i in range(1, 11))]
        ),
        "max_experts": st.sampled_from([None, 3]),
        "candidates": st.sampled_from([None, None, 2, 3]),
        "scaling": st.sampled_from([1.0, 2.5]),
        "seed": st.integers(0, 10_000),
        "n": st.integers(1, 9),
    }
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_every_rule_matches_the_loop_oracle(c):
    torch.manual_seed(c["seed"])
    groups, topk_groups = c["groups"]
    router = ScoredRouter(
        16, 8, score=c["score"], selection=c["selection"], k=c["k"], threshold=c["threshold"],
        entropy_cutoffs=c["cutoffs"], max_experts=c["max_experts"], normalize=c["normalize"],
        candidates=c["candidates"],
        scaling=c["scaling"], num_groups=groups, topk_groups=topk_groups, selection_bias=c["bias"],
        init_std=0.5,
    )  # fmt: skip
    if c["bias"]:
        router.selection_bias.normal_(0, 0.2)
    check_against_oracle(router, torch.randn(c["n"], 16))


def test_weight_gradients_match_the_oracle():
    torch.manual_seed(0)
    for score in ("softmax", "sigmoid"):
        for selection in ("topk", "threshold", "entropy_k"):
            router = ScoredRouter(
                8, 6, score=score, selection=selection, threshold=0.6, normalize=True,
                scaling=1.5, num_groups=3, topk_groups=2, selection_bias=True, init_std=0.5,
            )  # fmt: skip
            router.selection_bias.normal_(0, 0.1)
            x = torch.randn(5, 8, requires_grad=True)
            probe = torch.randn(5, 6)
            r = router(x)
            (r.weight * probe[r.token_idx, r.expert_idx]).sum().backward()
            gw, gx = router.weight.grad.clone(), x.grad.clone()
            router.weight.grad, x.grad = None, None
            total = sum(
                v * probe[t, e] for t, d in enumerate(oracle(router, x)) for e, v in d.items()
            )
            total.backward()
            assert torch.allclose(gw, router.weight.grad, atol=1e-5)
            assert torch.allclose(gx, x.grad, atol=1e-5)


def test_softmax_threshold_equals_the_xmoe_threshold_router():
    torch.manual_seed(1)
    ref = ThresholdRouter(16, 8, threshold=0.7)
    router = ScoredRouter(16, 8, selection="threshold", threshold=0.7)
    router.weight = ref.weight
    x = torch.randn(50, 16)
    a, b = ref(x), router(x)
    assert torch.equal(a.token_idx, b.token_idx) and torch.equal(a.expert_idx, b.expert_idx)
    assert torch.allclose(a.weight, b.weight)


def test_threshold_one_keeps_every_eligible_expert_and_no_other():
    torch.manual_seed(2)
    router = ScoredRouter(
        8, 8, score="sigmoid", selection="threshold", threshold=1.0, num_groups=4, topk_groups=2
    )
    r = router(torch.randn(7, 8))
    assert r.num_pairs == 7 * 4  # two groups of two experts each
    for t in range(7):
        groups = set((r.expert_idx[r.token_idx == t] // 2).tolist())
        assert len(groups) == 2


def test_entropy_k_by_hand():
    router = ScoredRouter(2, 4, selection="entropy_k", entropy_cutoffs=(0.5, 0.9))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[10.0, 0], [0, 0], [0, 0], [0, 0]]))
    # token 0: logits (0,0,0,0): uniform, H_norm = 1 > 0.9 -> k = 3
    # token 1: logits (10,0,0,0): peaked, H_norm ~ 0.0017 -> k = 1
    r = router(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert (r.token_idx == 0).sum() == 3 and (r.token_idx == 1).sum() == 1
    assert int(r.expert_idx[r.token_idx == 1]) == 0


def test_selection_bias_changes_the_choice_but_not_the_weights():
    router = ScoredRouter(2, 4, score="sigmoid", k=1, selection_bias=True)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0], [0.5, 0], [0, 0], [0, 0]]))
        router.selection_bias.copy_(torch.tensor([0.0, 0.5, 0, 0]))
    r = router(torch.tensor([[1.0, 0.0]]))
    assert int(r.expert_idx) == 1  # sigmoid(0.5) + 0.5 > sigmoid(1)
    assert abs(float(r.weight.detach()) - torch.sigmoid(torch.tensor(0.5)).item()) < 1e-7


def test_loss_free_bias_update_on_sigmoid_scores_moves_towards_underloaded_experts():
    torch.manual_seed(3)
    router = ScoredRouter(4, 4, score="sigmoid", k=1, loss_free_balance=True, bias_update_rate=0.1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0  # expert 0 wins every token with x[:, 0] > 0
    router.train()
    x = torch.rand(32, 4) + 0.1
    r = router(x)
    assert r.expert_counts[0] == 32
    assert router.selection_bias[0] < 0 and (router.selection_bias[1:] > 0).all()
    router.eval()
    before = router.selection_bias.clone()
    router(x)
    assert torch.equal(before, router.selection_bias)  # eval never updates


def test_registry_builds_it_and_checks_options():
    r = make_router("scored", 8, 4, score="sigmoid", selection="threshold", threshold=0.5)
    assert isinstance(r, ScoredRouter) and "scored" in ROUTERS
    bad = [
        {"score": "tanh"},
        {"selection": "top_p"},
        {"k": 5},
        {"threshold": 0.0},
        {"num_groups": 3},
        {"num_groups": 2, "topk_groups": 3},
        {"entropy_cutoffs": (0.6, 0.4)},
        {"entropy_cutoffs": (1.5,)},
        {"scaling": 0.0},
        {"normalize": 1},
        {"num_groups": 4, "topk_groups": 1, "k": 2},
    ]
    for opts in bad:
        with pytest.raises(ValueError):
            ScoredRouter(8, 4, **opts)


def test_options_rebuild_an_identical_router():
    torch.manual_seed(4)
    a = ScoredRouter(8, 8, score="sigmoid", selection="threshold", threshold=0.4, num_groups=2,
                     topk_groups=1, scaling=2.0, selection_bias=True)  # fmt: skip
    a.selection_bias.normal_()
    b = ScoredRouter(8, 8, **a.options())
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 8)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.expert_idx, rb.expert_idx) and torch.equal(ra.weight, rb.weight)


def test_threshold_probe_and_full_sort_give_the_same_pairs():
    """The threshold rule ranks only the top max(4, 2k) when that reaches t for every token,
    else all E; both paths agree with the oracle (peaked tokens, then flat ones)."""
    torch.manual_seed(5)
    router = ScoredRouter(8, 16, selection="threshold", threshold=0.6, k=1, init_std=3.0)
    x = torch.randn(20, 8)

    def ranked_width():
        with torch.no_grad():
            s = router.scores(router.logits(x))
            return router._threshold_order(router.selection_scores(s), s).shape[1]

    assert ranked_width() == 4  # the probe reached t for every token
    check_against_oracle(router, x)
    with torch.no_grad():
        router.weight.mul_(0.01)  # flat: t = 0.6 needs most of the 16 experts
    assert ranked_width() == 16 and router(x).experts_per_token > 8
    check_against_oracle(router, x)


def test_threshold_within_the_top_k_by_hand():
    router = ScoredRouter(2, 4, selection="threshold", threshold=0.6, candidates=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0], [0.5, 0], [0, 0], [0, 0]]))
    # token 0 = (0, 0): uniform, top-2 shares 0.5 / 0.5 -> both kept (0.5 < 0.6)
    # token 1 = (3, 0): logits (3, 1.5, 0, 0), top-2 shares 0.82 / 0.18 -> one kept
    r = router(torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    assert (r.token_idx == 0).sum() == 2 and (r.token_idx == 1).sum() == 1
    assert set(r.expert_idx[r.token_idx == 0].tolist()) <= {0, 1, 2, 3}
    assert int(r.expert_idx[r.token_idx == 1]) == 0
    p = torch.softmax(torch.tensor([3.0, 1.5, 0, 0]), 0)
    assert float(r.weight[r.token_idx == 1].detach()) == pytest.approx(float(p[0]))
