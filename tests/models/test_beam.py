"""Greedy and beam search against an exhaustive search on a tiny model and vocabulary."""

from __future__ import annotations

import itertools

import pytest
import torch

from xmoe.models.beam import beam_search, decode, greedy, score
from xmoe.models.seq2seq import Seq2Seq, Seq2SeqConfig
from xmoe.moe.config import MoEConfig

V = 5  # pad 0, bos 1, eos 2, words 3 and 4


def peaky_model(seed: int, max_len: int = 4) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(
        vocab_size=V,
        max_len=max_len,
        n_encoder_layers=2,
        n_decoder_layers=1,
        n_head=2,
        d_model=8,
        d_ff=16,
        dropout=0.0,
        moe=MoEConfig(num_experts=2, d_expert=8, router="topk", router_options={"k": 1}),
    )
    m = Seq2Seq(cfg).eval()
    with torch.no_grad():  # far from uniform, so the search matters and ties are unlikely
        m.tok_emb.weight.mul_(3.0)
        m.tgt_pos.weight.mul_(3.0)
    return m


def sequence_logprob(m: Seq2Seq, src: torch.Tensor, seq: list[int]) -> float:
    """log p(seq | src) by one teacher-forced forward (no cache)."""
    tgt_in = torch.tensor([[m.cfg.bos_id, *seq[:-1]]])
    with torch.no_grad():
        logits = m(src, tgt_in).logits
    logp = logits.float().log_softmax(-1)[0]
    return float(sum(logp[i, t] for i, t in enumerate(seq)))


def exhaustive(m: Seq2Seq, src: torch.Tensor, n: int, alpha: float) -> tuple[list[int], float]:
    """The best output over every sequence that ends at its first EOS or is cut at n."""
    best, best_score = None, -float("inf")
    eos = m.cfg.eos_id
    for length in range(1, n + 1):
        for body in itertools.product([t for t in range(V) if t != eos], repeat=length - 1):
            for last in range(V):
                if last != eos and length < n:
                    continue
                seq = [*body, last]
                s = score(sequence_logprob(m, src, seq), length, alpha)
                if s > best_score:
                    best, best_score = seq, s
    return [t for t in best if t != eos], best_score


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_a_beam_wider_than_the_search_space_finds_the_exhaustive_best(seed, alpha):
    m = peaky_model(seed)
    src = torch.tensor([[3, 4, 3, 2]])
    n = m.cfg.max_len - 1  # 3 target tokens at most
    want, _ = exhaustive(m, src, n, alpha)
    got = beam_search(m, src, beam=V**n, length_penalty=alpha)
    assert got == [want]


def test_beam_one_is_greedy_and_greedy_follows_the_argmax():
    m = peaky_model(3, max_len=6)
    src = torch.tensor([[3, 4, 4, 2], [4, 3, 2, 0]])
    g = greedy(m, src)
    assert beam_search(m, src, beam=1) == g
    # greedy by hand, one row at a time, with full re-decoding
    for row, out in zip(src, g):
        seq = [m.cfg.bos_id]
        for _ in range(m.cfg.max_len - 1):
            nxt = int(m(row[None], torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == m.cfg.eos_id:
                break
            seq.append(nxt)
        assert out == seq[1:]


def test_batched_beam_equals_one_source_at_a_time():
    m = peaky_model(4, max_len=7)
    src = torch.tensor([[3, 4, 4, 2], [4, 3, 2, 0], [3, 3, 2, 0]])
    together = beam_search(m, src, beam=3, length_penalty=1.0)
    alone = [
        beam_search(m, src[i : i + 1, : int((src[i] != 0).sum())], beam=3)[0] for i in range(3)
    ]
    assert together == alone


def test_wider_beams_never_score_worse_than_greedy_here():
    m = peaky_model(5)
    src = torch.tensor([[4, 4, 3, 2]])

    def s(seq):
        full = seq + [m.cfg.eos_id] if len(seq) < m.cfg.max_len - 1 else seq
        return score(sequence_logprob(m, src, full), len(full), 1.0)

    assert s(beam_search(m, src, beam=V**3)[0]) >= s(greedy(m, src)[0]) - 1e-6


def test_bad_arguments_are_named():
    m = peaky_model(0)
    src = torch.tensor([[3, 2]])
    with pytest.raises(ValueError, match="beam"):
        decode(m, src, beam=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy(m, src, max_len=10)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(m, src, length_penalty=-1.0)


def test_the_exhaustive_check_is_not_trivial_greedy_misses_the_best_sometimes():
    src = torch.tensor([[3, 4, 3, 2]])
    misses = 0
    for seed in range(3):
        m = peaky_model(seed)
        misses += sum(exhaustive(m, src, 3, a)[0] != greedy(m, src)[0] for a in (0.0, 1.0))
    assert misses > 0
