"""Hash layers (``xmoe.routing.hash``): the fixed token-id table."""

from __future__ import annotations

import pytest
import torch

from conftest import D_MODEL
from xmoe import MoE
from xmoe.routing import HashRouter


def _x(n, d=D_MODEL, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_hash_routing_is_deterministic_across_calls_and_same_seed_routers():
    a = HashRouter(D_MODEL, 4, vocab_size=97, seed=5)
    b = HashRouter(D_MODEL, 4, vocab_size=97, seed=5)
    c = HashRouter(D_MODEL, 4, vocab_size=97, seed=6)
    ids = torch.randint(0, 97, (200,))
    x = _x(200)
    r1, r2, r3 = a(x, token_ids=ids), a(x, token_ids=ids), b(_x(200, seed=9), token_ids=ids)
    assert torch.equal(r1.expert_idx, r2.expert_idx) and torch.equal(r1.expert_idx, r3.expert_idx)
    assert torch.equal(r1.expert_idx, a.table[ids])
    assert not torch.equal(a.table, c.table)
    # same id -> same expert, whatever the position
    for i in ids.unique().tolist():
        assert len(set(r1.expert_idx[ids == i].tolist())) == 1
    assert (r1.weight == 1).all() and r1.losses == {}
    assert list(a.parameters()) == []


@pytest.mark.parametrize(("vocab", "e"), [(100, 4), (103, 4), (50, 7), (3, 5)])
def test_hash_random_table_gives_each_expert_vocab_over_e_ids(vocab, e):
    counts = torch.bincount(HashRouter(D_MODEL, e, vocab_size=vocab).table, minlength=e)
    assert int(counts.sum()) == vocab
    assert int(counts.max()) - int(counts.min()) <= 1
    assert int(counts.min()) >= vocab // e - 1 and int(counts.max()) <= -(-vocab // e) + 1


def _expert_loads(table, counts, e):
    return torch.zeros(e, dtype=torch.float64).index_add(0, table, counts.double())


def test_hash_frequency_balance_equalises_total_frequency_on_zipf_counts():
    vocab, e = 2000, 8
    zipf = (1e6 / torch.arange(1, vocab + 1, dtype=torch.float64)).round()
    zipf = zipf[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    random_router = HashRouter(D_MODEL, e, vocab_size=vocab, balance="random")
    freq_router = HashRouter(D_MODEL, e, vocab_size=vocab, balance="frequency")
    assert torch.equal(freq_router.table, random_router.table)  # random until fitted
    freq_router.fit_frequencies(zipf)
    random_router.fit_frequencies(zipf)  # a no-op for balance="random"
    assert torch.equal(random_router.table, HashRouter(D_MODEL, e, vocab_size=vocab).table)
    rl = _expert_loads(random_router.table, zipf, e)
    fl = _expert_loads(freq_router.table, zipf, e)
    assert float(fl.sum()) == float(zipf.sum())
    random_ratio, freq_ratio = float(rl.max() / rl.min()), float(fl.max() / fl.min())
    assert freq_ratio < 1.02
    assert freq_ratio - 1 < 0.1 * (random_ratio - 1)


def test_hash_fit_frequencies_rejects_wrong_shape():
    router = HashRouter(D_MODEL, 4, vocab_size=10, balance="frequency")
    with pytest.raises(ValueError, match="shape"):
        router.fit_frequencies(torch.ones(11))


def test_hash_requires_in_range_token_ids():
    moe = MoE(D_MODEL, 4, 8, router="hash", vocab_size=10)
    x = _x(5)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match="vocab_size"):
        moe(x, token_ids=torch.tensor([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match="vocab_size"):
        moe(x, token_ids=torch.tensor([0, -1, 2, 3, 4]))
    with pytest.raises(ValueError, match="one id per token"):
        moe(x, token_ids=torch.tensor([0, 1]))
    assert moe(x, token_ids=torch.tensor([0, 1, 2, 3, 9])).shape == x.shape
