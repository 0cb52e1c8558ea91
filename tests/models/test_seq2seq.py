"""The encoder–decoder: shapes, MoE placement, padding, the incremental decoder's cache."""

from __future__ import annotations

import pytest
import torch

from xmoe.models.seq2seq import Seq2Seq, Seq2SeqConfig
from xmoe.moe.config import MoEConfig
from xmoe.moe.layer import MoE


def tiny(**kw) -> Seq2Seq:
    base = dict(
        vocab_size=23,
        max_len=12,
        n_encoder_layers=2,
        n_decoder_layers=2,
        n_head=2,
        d_model=16,
        d_ff=32,
        dropout=0.0,
        moe=MoEConfig(num_experts=4, d_expert=8, router="threshold"),
    )
    base.update(kw)
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(**base)).eval()


def batch(B=3, S=7, T=6, V=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (B, S), generator=g)
    src[0, 4:] = 0  # padding
    tgt = torch.randint(3, V, (B, T), generator=g)
    return src, tgt


def test_moe_sits_in_every_second_encoder_layer_only():
    m = tiny(n_encoder_layers=4)
    kinds = [isinstance(b.ffn.inner, MoE) for b in m.encoder]
    assert kinds == [False, True, False, True]
    assert not any(isinstance(b.ffn.inner, MoE) for b in m.decoder)
    m2 = tiny(decoder_moe_every=1)
    assert len(m2.moe_layers) == 1 + 2


def test_forward_shapes_loss_and_only_real_tokens_are_routed():
    m = tiny()
    src, tgt = batch()
    out = m(src, tgt, tgt, smoothing=0.1)
    assert out.logits.shape == (3, 6, 23)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.routings[0].num_tokens == int((src != 0).sum())
    out.loss.backward()
    assert m.encoder[1].ffn.inner.router.weight.grad is not None  # routers get gradients


def test_padding_does_not_change_the_other_positions():
    m = tiny()
    src, tgt = batch()
    short = src[:1, :4]  # row 0 without its padding
    a = m(short, tgt[:1]).logits
    b = m(src[:1], tgt[:1]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder_moe_every", [0, 1])
def test_incremental_decoding_with_cache_equals_full_redecoding(decoder_moe_every):
    m = tiny(decoder_moe_every=decoder_moe_every)
    src, tgt = batch()
    tgt_in = torch.cat([torch.full((3, 1), m.cfg.bos_id), tgt], 1)  # [B, 7]
    full = m(src, tgt_in).logits.float().log_softmax(-1)
    state = m.start(src)
    steps = [m.step(tgt_in[:, t], state) for t in range(tgt_in.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert state.cache.length == tgt_in.shape[1]


def test_lengths_over_max_len_raise_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="source length 13 exceeds max_len=12"):
        m.encode(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="target length"):
        m(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 13, dtype=torch.long))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="d_model"):
        Seq2Seq(Seq2SeqConfig(d_model=10, n_head=4))
    with pytest.raises(ValueError, match="eos_id"):
        Seq2Seq(Seq2SeqConfig(vocab_size=2))
