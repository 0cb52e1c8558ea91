"""Hand-computed cases of the exit distribution, the oracle exit, its gate targets and the
test-time rule (each expected value is worked out in the comment beside it)."""

import math

import pytest
import torch

from xmoe.exit import exit_distribution, gate_targets, gm_loss, im_loss, im_weights, oracle_exit
from xmoe.exit import test_time_exit as rule


def test_exit_distribution_hand_computed():
    gates = torch.tensor(
        [
            [0.5, 0.5, 0.0],  # pi = [0.5, 0.5*0.5, 0.5*0.5] = [0.5, 0.25, 0.25]
            [0.2, 0.5, 0.9],  # pi = [0.2, 0.8*0.5, 0.8*0.5] = [0.2, 0.4, 0.4] (g_L ignored)
            [1.0, 0.3, 0.7],  # leaves at the first exit for sure: [1, 0, 0]
            [0.0, 0.0, 0.0],  # never leaves early: the last exit takes it all: [0, 0, 1]
        ]
    )
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    pi = exit_distribution(gates)
    torch.testing.assert_close(pi, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pi.sum(1), torch.ones(4))


def test_exit_distribution_matches_a_loop():
    g = torch.rand(5, 7)
    pi = exit_distribution(g)
    for n in range(5):
        reach = 1.0
        for k in range(7):
            gk = 1.0 if k == 6 else g[n, k].item()
            assert pi[n, k].item() == pytest.approx(reach * gk, abs=1e-6)
            reach *= 1 - gk


def test_exit_distribution_rejects_a_vector():
    with pytest.raises(ValueError, match="gates must be"):
        exit_distribution(torch.rand(3))


def test_oracle_exit_hand_computed_with_ties_to_the_cheapest():
    losses = torch.tensor([[2.0, 1.0, 0.5]])
    costs = torch.tensor([0.25, 0.5, 1.0])
    # lam = 0: totals [2, 1, 0.5] -> exit 2
    assert oracle_exit(losses, costs, 0.0).tolist() == [2]
    # lam = 1: totals [2.25, 1.5, 1.5] -> tie between 1 and 2 -> the cheaper, 1
    assert oracle_exit(losses, costs, 1.0).tolist() == [1]
    # lam = 4: totals [3, 3, 4.5] -> tie between 0 and 1 -> 0
    assert oracle_exit(losses, costs, 4.0).tolist() == [0]
    with pytest.raises(ValueError, match="lam"):
        oracle_exit(losses, costs, -1.0)


def test_oracle_exit_per_input_costs():
    losses = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    costs = torch.tensor([[0.5, 1.0], [0.0, 2.0]])  # per input
    # lam = 1: row 0 totals [1.5, 1.0] -> 1; row 1 totals [1.0, 2.0] -> 0
    assert oracle_exit(losses, costs, 1.0).tolist() == [1, 0]


def test_gate_targets_hand_computed():
    targets, mask = gate_targets(torch.tensor([0, 1, 2]), 3)
    # oracle 0: gate 0 says leave; gates 1, 2 unreached
    # oracle 1: gate 0 says go on, gate 1 leave
    # oracle 2 (the last exit): gates 0, 1 say go on; the last exit has no gate
    assert targets.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]


def test_gm_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, math.inf]])
    # oracle 1: gate 0 target 0 and gate 1 target 1, both at logit 0: BCE log 2 each
    assert gm_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(2))
    # oracle 0: only gate 0 counts, target 1: log(1 + e^-2)
    logits = torch.tensor([[2.0, -5.0, math.inf]])
    assert gm_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log1p(math.exp(-2)))


def test_im_loss_weights_by_exit_distribution():
    gates = torch.tensor([[0.5, 0.5, 1.0]])  # pi = [0.5, 0.25, 0.25]
    losses = torch.tensor([[4.0, 2.0, 1.0]])
    # mix 0: 0.5*4 + 0.25*2 + 0.25*1 = 2.75
    assert im_loss(losses, im_weights(gates, 0.0)).item() == pytest.approx(2.75)
    # mix 1: uniform (4 + 2 + 1) / 3
    assert im_loss(losses, im_weights(gates, 1.0)).item() == pytest.approx(7 / 3)


def test_test_time_rule_hand_computed():
    gates = torch.tensor(
        [
            [0.4, 0.6, 0.0],  # first gate > 0.5 is exit 1
            [0.5, 0.5, 0.0],  # 0.5 is not above 0.5: falls through to the last exit (2)
            [0.9, 0.1, 0.0],  # leaves at exit 0
            [0.1, 0.2, 0.0],  # the last exit (its gate is never read)
        ]
    )
    assert rule(gates).tolist() == [1, 2, 0, 2]
