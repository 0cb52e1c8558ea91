"""Baseline exit rules, ECE, the reliability bins and split conformal on hand-computed cases."""

import math

import pytest
import torch

from xmoe.exit.metrics import conformal_quantile, conformal_sets, conformal_summary, reliability
from xmoe.exit.policies import confidence_exit, entropy_exit, exit_probs, fixed_exit


def logits_of(probs):
    return torch.tensor(probs).log()


def test_confidence_exit_takes_the_first_confident_layer():
    # one input, 3 exits, 2 classes: max probs 0.6, 0.8, 0.7
    logits = logits_of([[[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]]])
    assert confidence_exit(logits, 0.75).tolist() == [1]
    assert confidence_exit(logits, 0.5).tolist() == [0]
    assert confidence_exit(logits, 0.9).tolist() == [2]  # nothing reaches it: the last exit


def test_entropy_exit_hand_computed():
    # normalised entropy of [0.5, 0.5] is 1; of [0.9, 0.1] it is 0.469
    logits = logits_of([[[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]]])
    assert entropy_exit(logits, 0.5).tolist() == [1]
    assert entropy_exit(logits, 0.1).tolist() == [2]


def test_fixed_exit_and_exit_probs():
    logits = logits_of([[[0.6, 0.4], [0.2, 0.8]], [[0.3, 0.7], [0.9, 0.1]]])
    exits = fixed_exit(2, 1, 2)
    torch.testing.assert_close(exit_probs(logits, exits), torch.tensor([[0.2, 0.8], [0.9, 0.1]]))
    with pytest.raises(ValueError, match="exit_index"):
        fixed_exit(2, 2, 2)


def test_ece_hand_computed():
    # max probs 0.9, 0.9, 0.6, 0.6; right, wrong, right, right
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    # two bins of width 0.5: all four in [0.5, 1): mean confidence 0.75 = accuracy 3/4 -> 0
    r = reliability(probs, labels, bins=2)
    assert r.ece == pytest.approx(0.0, abs=1e-7)
    assert r.count == [0, 4]
    r = reliability(probs, labels, bins=10)
    # bin 6 holds 0.6, 0.6 (both right): |1 - 0.6|; bin 9 holds 0.9, 0.9: |0.5 - 0.9|
    assert r.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert r.accuracy[6] == 1.0 and r.accuracy[9] == 0.5


def test_conformal_hand_computed():
    # scores 1 - p_y: 0.1, 0.2, 0.3, 0.4; n = 4, alpha = 0.5 -> k = ceil(5 * 0.5) = 3 -> q = 0.3
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    q = conformal_quantile(probs, labels, alpha=0.5)
    assert q == pytest.approx(0.3)
    sets = conformal_sets(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), q)
    # class c is in iff 1 - p_c <= 0.3: {0} for the first, {} for the second
    assert sets.tolist() == [[True, False], [False, False]]
    s = conformal_summary(sets, torch.tensor([0, 1]))
    assert s == {"set_size": 0.5, "coverage": 0.5}
    # alpha so small that k > n: every class is in every set
    assert conformal_quantile(probs, labels, alpha=0.1) == 1.0


def test_conformal_coverage_holds_on_random_data():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4000, 5, generator=g).softmax(-1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    q = conformal_quantile(probs[:2000], labels[:2000], alpha=0.1)
    cov = conformal_summary(conformal_sets(probs[2000:], q), labels[2000:])["coverage"]
    assert cov >= 0.9 - 3 * math.sqrt(0.09 / 2000)
