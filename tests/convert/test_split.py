"""Neuron splits into equal experts (convert/split.py)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import (
    D_FF,
    D,
    tiny_llama,
)

from xmoe.convert import (
    find_ffns,
    split_neurons,
)
from xmoe.convert.ffn import DenseFFN


@pytest.mark.parametrize("method", ["coact", "params", "random"])
def test_split_methods_give_equal_size_partitions(method):
    model = tiny_llama()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    acts = dense.neuron_acts(torch.randn(100, D))
    groups = split_neurons(method, dense, 8, acts, seed=1)
    assert groups.shape == (8, D_FF // 8)
    assert sorted(groups.flatten().tolist()) == list(range(D_FF))


def test_params_split_groups_neurons_with_similar_input_weights():
    # Four directions, 8 neurons each (noisy copies): balanced k-means must recover them.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, D, generator=g)
    w1 = base.repeat_interleave(8, 0) + 0.01 * torch.randn(32, D, generator=g)
    w1 = w1[torch.randperm(32, generator=g)]
    dense = DenseFFN(w1, None, torch.randn(D, 32), None, torch.relu)
    groups = split_neurons("params", dense, 4, seed=0)
    for grp in groups:
        dirs = {int((base @ w1[j]).argmax()) for j in grp.tolist()}
        assert len(dirs) == 1, groups
