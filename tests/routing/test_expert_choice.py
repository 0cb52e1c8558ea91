"""Expert Choice routing (``xmoe.routing.expert_choice``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import D_MODEL, NUM_EXPERTS
from xmoe import MoE
from xmoe.routing import ExpertChoiceRouter

FAST = settings(max_examples=25, deadline=None)


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _expert_choice(*args, **kwargs):
    with pytest.warns(UserWarning, match="leak"):
        return ExpertChoiceRouter(*args, **kwargs)


@FAST
@given(
    n=st.integers(1, 30),
    e=st.integers(1, 6),
    c=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 10.0]),
    seed=st.integers(0, 100),
)
def test_expert_choice_gives_each_expert_min_n_ceil_c_n_over_e_top_tokens(n, e, c, seed):
    router = _expert_choice(D_MODEL, e, expert_capacity=c, init_std=0.5)
    x = _x(n, seed=seed)
    routing = router(x)
    quota = min(n, math.ceil(c * n / e))
    assert routing.expert_counts.tolist() == [quota] * e
    probs = (x @ router.weight.detach().T).softmax(-1)
    for ex in range(e):
        toks = routing.token_idx[routing.expert_idx == ex].tolist()
        assert len(set(toks)) == quota
        # they are the expert's top-quota tokens by probability
        chosen_min = float(probs[toks, ex].min())
        others = [t for t in range(n) if t not in set(toks)]
        if others:
            assert float(probs[others, ex].max()) <= chosen_min + 1e-7


def test_expert_choice_warns_about_causal_leakage_on_construction():
    with pytest.warns(UserWarning, match="future"):
        MoE(D_MODEL, NUM_EXPERTS, 8, router="expert_choice")
