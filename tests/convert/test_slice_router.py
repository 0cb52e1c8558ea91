"""The slice router (convert/router.py): threshold rule, unit weights, learned or given share."""

from __future__ import annotations

import pytest
import torch

from xmoe.convert.router import SliceRouter, threshold_routing
from xmoe.routing import Router


def test_threshold_routing_keeps_smallest_prefix_with_unit_weights():
    share = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]])
    r = threshold_routing(share, 0.8)
    kept = {(t, e) for t, e in zip(r.token_idx.tolist(), r.expert_idx.tolist())}
    assert kept == {(0, 0), (0, 1), (1, 3), (1, 2), (1, 1), (2, 0)}
    assert torch.equal(r.weight, torch.ones(len(kept)))


def test_slice_router_is_a_router_with_uniform_share_at_t1():
    router = SliceRouter(4, 3, threshold=1.0)
    assert isinstance(router, Router)
    x = torch.randn(5, 4)
    r = router(x)
    assert r.num_pairs == 15 and torch.equal(r.weight, torch.ones(15))  # every expert, weight 1
    router.set_threshold(0.5)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))
    torch.testing.assert_close(router.share(x), router.logits(x).softmax(-1))
    assert router(x).expert_idx.tolist() == [0] * 5  # expert 0 holds > half of each share
    given = torch.tensor([[0.1, 0.2, 0.7]]).expand(5, 3)
    assert router(x, share=given).expert_idx.tolist() == [2] * 5
    with pytest.raises(ValueError, match="threshold"):
        router.set_threshold(0.0)
