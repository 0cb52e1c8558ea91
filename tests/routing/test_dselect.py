"""DSelect-k gate (``xmoe.routing.dselect``): properties of its own (the shared ones are in
``test_smooth_step.py``), against the loop reference of ``smooth_step_oracles``.
"""

from __future__ import annotations

import math

import pytest
import torch
from smooth_step_oracles import big_params, dense_from_routing, ref_dselect

from conftest import D_MODEL
from xmoe.routing.dselect import DSelectKRouter


@pytest.mark.parametrize("num_experts,k", [(3, 2), (5, 2), (6, 3), (7, 1)])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_dselect_non_power_of_two_sum_plus_nonexistent_mass_is_one(num_experts, k, scale):
    router = DSelectKRouter(D_MODEL, num_experts, k=k)
    if scale is not None:
        big_params(router, scale)
    x = torch.randn(32, D_MODEL)
    routing = router(x)
    w = dense_from_routing(routing)
    ref = ref_dselect(router, x)
    lost = torch.tensor(
        [sum(float(v.detach()) for c, v in r.items() if c >= num_experts) for r in ref]
    )
    assert (lost.min() if scale is None else lost.max()) > 0
    torch.testing.assert_close(w.sum(-1) + lost, torch.ones(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.extras["nonexistent_weight"], lost.mean(), atol=1e-6, rtol=0)
    assert routing.losses["nonexistent_mass"].item() > 0


@pytest.mark.parametrize("num_experts,k", [(2, 1), (4, 2), (8, 3), (16, 5)])
def test_dselect_zero_z_is_uniform(num_experts, k):
    router = DSelectKRouter(D_MODEL, num_experts, k=k, alpha_init_scale=1.0)
    with torch.no_grad():
        router.z_weight.zero_()
    routing = router(torch.randn(16, D_MODEL))
    w = dense_from_routing(routing)
    assert routing.num_pairs == 16 * num_experts
    torch.testing.assert_close(w, torch.full((16, num_experts), 1 / num_experts), atol=1e-7, rtol=0)
    assert routing.losses["entropy"].item() == pytest.approx(k * math.log(num_experts), rel=1e-5)
