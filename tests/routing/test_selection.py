"""Shared selection machinery of the preference routers (``xmoe.routing.selection``): null
experts and loss-free balancing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS, reference_threshold
from xmoe import MoE
from xmoe.routing import ThresholdRouter, TopKRouter

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _pairs_per_token(routing):
    return torch.bincount(routing.token_idx, minlength=routing.num_tokens)


# --------------------------------------------------------------------------------------------
# Null experts
# --------------------------------------------------------------------------------------------


@FAST
@given(
    kind=st.sampled_from(["threshold", "topk"]),
    z=st.integers(1, 4),
    t=st.floats(0.3, 0.95),
    k=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_null_experts_are_never_computed_and_null_fraction_is_exact(kind, z, t, k, seed):
    e, n = NUM_EXPERTS, 30
    if kind == "threshold":
        router = ThresholdRouter(D_MODEL, e, threshold=t, num_null_experts=z, init_std=0.5)
    else:
        router = TopKRouter(D_MODEL, e, k=k, num_null_experts=z, init_std=0.5)
    assert router.weight.shape == (e + z, D_MODEL)
    x = _x(n, seed=seed)
    routing = router(x)
    assert routing.num_experts == e
    assert all(ex < e for ex in routing.expert_idx.tolist())
    probs = (x @ router.weight.detach().T).softmax(-1)  # over E + Z
    if kind == "threshold":
        sel = reference_threshold(probs, t)
        assume(_away_from_threshold(probs, t))
    else:
        sel = [[(int(ex), r) for r, ex in enumerate(row)] for row in probs.topk(k, -1).indices]
    real = {(tok, ex) for tok, s in enumerate(sel) for ex, _ in s if ex < e}
    assert set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist())) == real
    hit = [any(ex >= e for ex, _ in s) for s in sel]
    nf = float(routing.extras["null_fraction"])
    assert 0.0 <= nf <= 1.0
    assert nf == pytest.approx(sum(hit) / n)


def _away_from_threshold(probs, t, eps=1e-5):
    for row in probs.double().sort(-1, descending=True).values.tolist():
        acc = 0.0
        for v in row:
            acc += v
            if abs(acc - t) < eps:
                return False
    return True


def test_null_expert_mass_counts_toward_the_threshold():
    e, z = 4, 1
    router = ThresholdRouter(D_MODEL, e, threshold=0.9, num_null_experts=z)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[e, 0] = 1.0  # the null expert's logit is x[:, 0]; real logits are 0
    x = torch.zeros(3, D_MODEL)
    x[:, 0] = torch.tensor([10.0, 2.0, -5.0])
    # token 0: p_null ~ 0.9998 >= 0.9 alone -> nothing computed.
    # token 1: p_null = e^2 / (e^2 + 4) = 0.649, each real 0.088: prefix masses before ranks
    #   1..4 are 0.649, 0.737, 0.825, 0.912 -> null + 3 real experts (if the null's mass did
    #   not count, the real experts alone, 0.35 in all, would never reach t: all 4 kept).
    # token 2: null is last; four real experts of 0.25 each: ranks until mass >= 0.9 -> all 4.
    routing = router(x)
    per_token = _pairs_per_token(routing).tolist()
    assert per_token == [0, 3, 4]
    assert float(routing.extras["null_fraction"]) == pytest.approx(2 / 3)
    moe = MoE(D_MODEL, e, 8, router=router)
    y = moe(x)
    assert torch.equal(y[0], torch.zeros(D_MODEL))  # an all-null token gets zero MoE output


# --------------------------------------------------------------------------------------------
# Loss-free balancing
# --------------------------------------------------------------------------------------------


def test_loss_free_bias_moves_toward_underloaded_experts_only_in_training():
    rate = 0.01
    router = TopKRouter(
        D_MODEL, NUM_EXPERTS, k=1, loss_free_balance=True, bias_update_rate=rate, init_std=0.5
    )
    with torch.no_grad():
        router.weight[0] += 0.3
    x = _x(64) + 0.5
    assert torch.equal(router.selection_bias, torch.zeros(NUM_EXPERTS))
    load = torch.bincount((x @ router.weight.detach().T).argmax(-1), minlength=NUM_EXPERTS)
    router.train()(x)
    expected = rate * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(router.selection_bias, expected, atol=0, rtol=0)
    assert float(router.selection_bias[int(load.argmax())]) < 0  # overloaded expert pushed down
    before = router.selection_bias.clone()
    router.eval()(x)
    router.eval()(x)
    assert torch.equal(router.selection_bias, before)
    assert not any(b.requires_grad for b in router.buffers())


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_loss_free_bias_changes_selection_but_not_combine_weights(kind):
    opts = dict(loss_free_balance=True, init_std=0.5)
    router = (
        TopKRouter(D_MODEL, NUM_EXPERTS, k=2, **opts)
        if kind == "topk"
        else ThresholdRouter(D_MODEL, NUM_EXPERTS, threshold=0.6, **opts)
    )
    router.selection_bias.copy_(torch.tensor([0.5, 0.0, 0.0, -0.5]))
    x = _x(64)
    routing = router.eval()(x)
    probs = (x @ router.weight.detach().T).softmax(-1)
    torch.testing.assert_close(routing.weight, probs[routing.token_idx, routing.expert_idx])
    torch.testing.assert_close(routing.score, probs[routing.token_idx, routing.expert_idx])
    top1 = routing.expert_idx[routing.rank == 0]
    assert (top1 == 0).float().mean() > (probs.argmax(-1) == 0).float().mean()


def _imbalance(routing):
    c = routing.expert_counts.float()
    return float(c.max() / c.mean())


def test_loss_free_balancing_reduces_load_imbalance_of_a_skewed_router():
    def skewed(loss_free):
        torch.manual_seed(0)
        r = TopKRouter(
            D_MODEL, NUM_EXPERTS, k=1, init_std=0.3, loss_free_balance=loss_free,
            bias_update_rate=0.01,
        )  # fmt: skip
        with torch.no_grad():
            r.weight[0] += 0.4
        return r

    plain, balanced = skewed(False).train(), skewed(True).train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(128, D_MODEL, generator=gen) + 0.5
        balanced(x)
    x = torch.randn(512, D_MODEL, generator=gen) + 0.5
    before, after = _imbalance(plain.eval()(x)), _imbalance(balanced.eval()(x))
    assert before > 2.0  # really skewed
    assert after < 1.5 and after < before - 0.5


def test_loss_free_bias_follows_the_load_summed_by_reduce_stats():
    # Another "rank" holds 100 extra pairs on expert 0: the global load is overloaded there.
    rate = 0.01
    router = TopKRouter(D_MODEL, NUM_EXPERTS, k=1, loss_free_balance=True, bias_update_rate=rate)
    calls = []

    def reduce(t):  # [E] expert load for the bias; [2E + 2] load-balance statistics
        calls.append(t.numel())
        return t + torch.tensor([100.0, 0.0, 0.0, 0.0]) if t.numel() == NUM_EXPERTS else t

    router.reduce_stats = reduce
    routing = router.train()(_x(8))
    load = routing.expert_counts.float() + torch.tensor([100.0, 0.0, 0.0, 0.0])
    expected = rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.selection_bias, expected, atol=0, rtol=0)
    assert float(router.selection_bias[0]) < 0 and (router.selection_bias[1:] > 0).all()
    assert calls == [2 * NUM_EXPERTS + 2, NUM_EXPERTS]  # load balance, then the bias
    router.eval()(_x(8))
    assert len(calls) == 2  # eval: no reduction, no update
