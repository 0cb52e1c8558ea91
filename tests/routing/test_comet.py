"""COMET tree gate (``xmoe.routing.comet``): properties of its own (the shared ones are in
``test_smooth_step.py``).
"""

from __future__ import annotations

import pytest
import torch
from smooth_step_oracles import dense_from_routing

from conftest import D_MODEL
from xmoe import MoE
from xmoe.routing.comet import CometRouter


@pytest.mark.parametrize("num_experts", [3, 5, 6])
def test_comet_non_power_of_two_weights_sum_to_one(num_experts):
    router = CometRouter(D_MODEL, num_experts, k=2)
    x = torch.randn(32, D_MODEL)
    routing = router(x)
    torch.testing.assert_close(
        dense_from_routing(routing).sum(-1), torch.ones(32), atol=1e-6, rtol=0
    )
    assert routing.losses["nonexistent_mass"].item() > 0


def test_comet_zero_nodes_and_leaves_is_uniform():
    router = CometRouter(D_MODEL, 8, k=3)
    with torch.no_grad():
        router.node_weight.zero_()
        router.leaf_weight.zero_()
    w = dense_from_routing(router(torch.randn(16, D_MODEL)))
    torch.testing.assert_close(w, torch.full((16, 8), 1 / 8), atol=1e-7, rtol=0)


def test_comet_tokens_whose_trees_all_end_on_nonexistent_leaves_get_no_pairs():
    # E = 3 (4 leaves). Node weights -10 on feature 0, feature 0 = +1: every node goes right, so
    # every tree ends on leaf 3, which names no expert.
    router = CometRouter(D_MODEL, 3, k=2)
    with torch.no_grad():
        router.node_weight.zero_()
        router.node_weight[:, 0] = -10.0
    x = torch.randn(8, D_MODEL)
    x[:, 0] = 1.0
    x[4:, 0] = -1.0  # these tokens go left at every node: leaf 0 in both trees
    x.requires_grad_(True)
    moe = MoE(D_MODEL, 3, 8, router=router, backend="loop")
    y = moe(x)
    routing = moe.last_routing
    assert set(routing.token_idx.tolist()) == {4, 5, 6, 7}
    assert routing.expert_idx.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(routing.weight, torch.ones(4), atol=1e-6, rtol=0)
    assert torch.equal(y[:4], torch.zeros(4, D_MODEL))
    assert routing.extras["empty_fraction"].item() == 0.5
    loss = y.sum() + sum(routing.losses.values())
    grads = torch.autograd.grad(loss, [x, *router.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
