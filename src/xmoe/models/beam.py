"""Greedy and beam-search decoding for :class:`~xmoe.models.seq2seq.Seq2Seq`, incremental.

Both run the decoder one token per step on its KV cache (:meth:`Seq2Seq.step`), over all
sources of a batch at once. A hypothesis ``y_1 .. y_n`` (EOS included) scores
``sum(log p(y_i)) / n ** length_penalty`` (fairseq's rule: 0 = raw log-probability, 1 = the
mean per token; larger values favour longer outputs). Beam search keeps ``beam`` live
hypotheses per source; a hypothesis that emits EOS among the best ``beam`` candidates is
finished; the search of a source stops when it has ``beam`` finished hypotheses, and every
search stops after ``max_len`` tokens (live hypotheses are then finished as they are).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, check_range
from .seq2seq import Seq2Seq


def _max_len(model: Seq2Seq, max_len: int | None) -> int:
    """Target tokens to generate at most (EOS included); the decoder holds ``max_len - 1``
    after BOS."""
    cap = model.cfg.max_len - 1
    if max_len is None:
        return cap
    return check_int("max_len", max_len, 1, cap)


def score(logprob: float, length: int, length_penalty: float) -> float:
    """The normalised score of a hypothesis of ``length`` tokens (EOS included)."""
    return logprob / (length**length_penalty)


@torch.no_grad()
def greedy(model: Seq2Seq, src: Tensor, max_len: int | None = None) -> list[list[int]]:
    """The arg-max token at every step, for each row of ``src: [B, S]``; ids without EOS."""
    n = _max_len(model, max_len)
    c = model.cfg
    state = model.start(src)
    tokens = torch.full((src.shape[0],), c.bos_id, dtype=torch.long, device=src.device)
    out = [[] for _ in range(src.shape[0])]
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(n):
        tokens = model.step(tokens, state).argmax(-1)
        for i in (~done).nonzero().flatten().tolist():
            if tokens[i].item() != c.eos_id:
                out[i].append(tokens[i].item())
        done |= tokens == c.eos_id
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def beam_search(
    model: Seq2Seq,
    src: Tensor,
    beam: int = 4,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[list[int]]:
    """The best hypothesis found for each row of ``src: [B, S]`` (ids without EOS)."""
    check_int("beam", beam, 1)
    check_range("length_penalty", length_penalty, 0.0, 10.0)
    n = _max_len(model, max_len)
    c = model.cfg
    B, V, dev = src.shape[0], c.vocab_size, src.device
    state = model.start(src)
    # one live row per source at step 0, then `beam` per source
    state = state.select(torch.arange(B, device=dev).repeat_interleave(beam))
    scores = torch.full((B, beam), -float("inf"), device=dev)
    scores[:, 0] = 0.0  # the other copies of BOS start dead, so step 1 expands one row
    seqs = torch.zeros((B, beam, 0), dtype=torch.long, device=dev)
    tokens = torch.full((B * beam,), c.bos_id, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = [True] * B
    for t in range(1, n + 1):
        logp = model.step(tokens, state).view(B, beam, V)
        cand = (scores[:, :, None] + logp).view(B, beam * V)
        top, idx = cand.topk(min(2 * beam, beam * V), dim=1)  # enough to refill after EOS
        row, tok = idx // V, idx % V
        is_eos = tok == c.eos_id
        # finished: EOS candidates among the best `beam` of each source; at the last step
        # every one of them (the others are cut at max_len, with no EOS)
        last = t == n
        ends = is_eos[:, :beam] | last
        for b, k in (ends & torch.isfinite(top[:, :beam])).nonzero().tolist():
            if active[b]:
                hyp = seqs[b, row[b, k]].tolist() + ([] if is_eos[b, k] else [tok[b, k].item()])
                finished[b].append((score(top[b, k].item(), t, length_penalty), hyp))
        for b in range(B):
            if active[b] and len(finished[b]) >= beam:
                active[b] = False
        if last or not any(active):
            break
        # next live hypotheses: the best `beam` non-EOS candidates (stable order)
        order = (is_eos.long() * (2 * beam) + torch.arange(top.shape[1], device=dev)).argsort(1)
        keep = order[:, :beam]
        new_scores = top.gather(1, keep).masked_fill(is_eos.gather(1, keep), -float("inf"))
        new_rows = row.gather(1, keep)
        new_tok = tok.gather(1, keep)
        seqs = torch.cat(
            [seqs.gather(1, new_rows[:, :, None].expand(-1, -1, t - 1)), new_tok[:, :, None]], 2
        )
        flat_rows = (torch.arange(B, device=dev)[:, None] * beam + new_rows).flatten()
        state = state.select(flat_rows)
        scores, tokens = new_scores, new_tok.flatten()
    return [max(pool, key=lambda p: p[0])[1] if pool else [] for pool in finished]


def decode(
    model: Seq2Seq,
    src: Tensor,
    beam: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[list[int]]:
    """Greedy for ``beam == 1``, else beam search."""
    if check_int("beam", beam, 1) == 1:
        return greedy(model, src, max_len)
    return beam_search(model, src, beam, length_penalty, max_len)
