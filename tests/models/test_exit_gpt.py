"""ExitGPT: per-token exits with propagated keys/values. Cached generation with exits must give
the tokens and logits of the parallel pass at the same exit decisions; costs match a hand count."""

import pytest
import torch

from xmoe.models.exit_gpt import ExitGPT
from xmoe.models.gpt import GPTConfig
from xmoe.moe.config import MoEConfig


def tiny(moe: bool) -> GPTConfig:
    return GPTConfig(
        vocab_size=64, block_size=24, n_layer=4, n_head=2, d_model=16, d_ff=32,
        moe_every=1 if moe else 0,
        moe=MoEConfig(num_experts=4, d_expert=8, router="threshold",
                      router_options={"threshold": 0.7}, backend="segment"),
    )  # fmt: skip


def model_with_busy_gates(moe: bool) -> ExitGPT:
    """Gates that leave on an above-median margin at each exit, so that about half of the
    tokens still running leave at each depth."""
    torch.manual_seed(0)
    m = ExitGPT(tiny(moe), lambdas=(0.1, 1.0)).eval()
    with torch.no_grad():
        m.gpt.tok_emb.weight.normal_(0, 1.0)  # logits far from uniform: margins that differ
        logits, _ = m.forward_all(torch.randint(0, 64, (4, 16)))
        for i, gate in enumerate(m.gates[0]):
            top2 = logits[:, :, i].softmax(-1).topk(2, dim=-1).values
            median = (top2[..., 0] - top2[..., 1]).median()
            first, last = gate.net[0], gate.net[2]
            for p in gate.parameters():
                p.zero_()
            first.weight[0, 2] = 50.0  # feature 2: the margin
            first.bias[0] = -50.0 * median
            last.weight[0, 0] = 10.0
    return m


def test_without_exits_equals_the_gpt():
    m = model_with_busy_gates(moe=False)
    idx = torch.randint(0, 64, (2, 10))
    out = m.exit_forward(idx, member=None)
    torch.testing.assert_close(out.logits, m.gpt(idx).logits)
    assert (out.exits == 3).all()


@pytest.mark.parametrize("moe", [False, True])
def test_generation_with_exits_matches_the_parallel_pass(moe):
    m = model_with_busy_gates(moe)
    prompt = torch.randint(0, 64, (3, 5))
    tokens, exits = m.generate_greedy(prompt, max_new_tokens=12, member=0)
    assert tokens.shape == (3, 17) and exits.shape == (3, 16)
    assert len(exits.unique()) > 1  # tokens do leave early (and at different depths)
    full = m.exit_forward(tokens[:, :-1], member=None, forced=exits)
    assert torch.equal(full.exits, exits)
    # the same exit decisions give the same next tokens as the cached, token-by-token decoding
    assert torch.equal(full.logits[:, 4:].argmax(-1), tokens[:, 5:])
    # and the parallel pass with the gates reaches the same decisions by itself
    free = m.exit_forward(tokens[:, :-1], member=0)
    assert torch.equal(free.exits, exits)
    torch.testing.assert_close(free.logits, full.logits)
    # propagation matters: the no-exit pass differs on tokens after an early exit
    plain = m.exit_forward(tokens[:, :-1], member=None)
    assert not torch.allclose(plain.logits, full.logits)


def test_cost_per_token_hand_count():
    m = model_with_busy_gates(moe=False)
    d, d_ff, L = 16, 32, 4
    idx = torch.randint(0, 64, (1, 3))
    per_block = [8 * d * d + 4 * (t + 1) * d + 4 * d * d_ff for t in range(3)]
    out = m.exit_forward(idx, member=None)
    assert out.flops[0].tolist() == [L * c for c in per_block]
    # every token leaves after block 0: one full block, then K/V projections (4 d^2) in 3 more
    out = m.exit_forward(idx, forced=torch.zeros(1, 3, dtype=torch.long))
    assert out.flops[0].tolist() == [c + 3 * 4 * d * d for c in per_block]


def test_generate_refuses_past_block_size():
    m = model_with_busy_gates(moe=False)
    with pytest.raises(ValueError, match="block_size"):
        m.generate_greedy(torch.zeros(1, 20, dtype=torch.long), max_new_tokens=10)
