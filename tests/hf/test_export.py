"""xmoe.hf.export: a qwen3_moe GPT written as a Qwen3-MoE folder that plain transformers loads.

Round trips go through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer`` with no
custom code; the threshold case also through ``xmoe.hf.from_pretrained`` (exact routing back).
"""

import json

import pytest
import torch
from hf_moe_tiny import qwen_gpt_config
from tokenizers import Tokenizer

from xmoe.data.tokenizer import EOS, train_tokenizer
from xmoe.hf.export import (
    SECTION,
    compare_logits,
    export_model,
    hf_config,
    read_xmoe_section,
    restore_routing,
)
from xmoe.models import GPT, GPTConfig, MoEConfig

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

VOCAB = 300


def qwen_gpt(router="topk", options=None, *, seed=0, **overrides) -> GPT:
    """A tiny qwen3_moe GPT with weights scaled up so logits are O(1) and routing is decisive."""
    cfg = qwen_gpt_config(router, options, **{"vocab_size": VOCAB, **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln" in name or name.startswith("ln_f"):
                p.uniform_(0.5, 1.5)
            elif "router" not in name:
                p.mul_(8.0)
    return model


def ids(batch=3, length=16, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_hf(path):
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n" * 30
    return train_tokenizer([text], VOCAB)


@pytest.mark.parametrize(
    ("overrides", "options", "norm"),
    [
        ({}, {"k": 2}, False),
        ({"tie_embeddings": False, "moe_every": 1}, {"k": 2, "renormalize": True}, True),
        ({"moe_every": 3, "rope_theta": 500.0, "norm_eps": 1e-5}, {"k": 1}, False),
    ],
)
def test_topk_export_loads_in_plain_transformers_with_the_same_logits(
    tmp_path, overrides, options, norm
):
    model = qwen_gpt(options=options, **overrides)
    out = export_model(model, tmp_path / "hf")
    hf = load_hf(out)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert hf.config.num_experts_per_tok == options["k"] and hf.config.norm_topk_prob is norm
    sparse = [i for i, b in enumerate(model.blocks) if hasattr(b.ffn, "router")]
    assert [i for i in range(3) if i not in hf.config.mlp_only_layers] == sparse
    x = ids()
    ours, theirs = model(x).logits, hf(input_ids=x).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    result = compare_logits(model, out, x)
    assert result["max_abs_diff"] <= 1e-4 and result["exact_routing"]


@pytest.mark.parametrize(("router", "norm"), [("switch", False), ("gshard", True)])
def test_switch_and_gshard_export_their_eval_routing_exactly(tmp_path, router, norm):
    model = qwen_gpt(router, {})
    out = export_model(model, tmp_path / "hf")
    hf = load_hf(out)
    assert hf.config.norm_topk_prob is norm
    x = ids()
    torch.testing.assert_close(hf(input_ids=x).logits, model(x).logits, rtol=0, atol=1e-4)


def test_transformers_greedy_generation_equals_xmoe_generation(tmp_path):
    model = qwen_gpt()
    hf = load_hf(export_model(model, tmp_path / "hf"))
    prompt = ids(1, 4)
    theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = model.generate(prompt, 10, top_k=1)  # KV-cached, top-1 = greedy
    assert torch.equal(theirs, ours)


def test_tokenizer_round_trips_through_autotokenizer(tmp_path, tokenizer):
    model = qwen_gpt()
    out = export_model(model, tmp_path / "hf", tokenizer)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    text = "ROMEO.\n  But soft, what light?  é 日本" + EOS
    assert tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert tok.decode(tokenizer.encode(text).ids) == text
    assert tok.eos_token == EOS and tok.eos_token_id == tokenizer.token_to_id(EOS)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id(EOS)


def test_threshold_export_is_topk_at_max_experts_with_the_exact_routing_in_the_section(tmp_path):
    options = {"threshold": 0.6, "max_experts": 3, "init_std": 0.5}
    model = qwen_gpt("threshold", options)
    out = export_model(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 3 and config["norm_topk_prob"] is False
    section = config[SECTION]
    assert section["exact"] is False
    assert section["layers"] == {
        "1": {
            "router": "threshold",
            "options": {"threshold": 0.6, "max_experts": 3, "renormalize": False},
        }
    }
    x = ids()
    ours = model(x).logits
    ept = model(x).routings[0].experts_per_token
    assert 1 <= ept < 3  # the threshold keeps fewer than the exported k
    plain = load_hf(out)(input_ids=x).logits
    assert (plain - ours).abs().max() > 1e-3  # plain transformers runs top-3, not the threshold

    hf = load_hf(out)
    gate_weight = hf.model.layers[1].mlp.gate.weight
    moe = _patch_with_xmoe_moe(hf)
    changed = restore_routing(hf, read_xmoe_section(out))
    assert list(changed) == [1] and changed[1] is moe
    assert moe.router.weight is gate_weight
    torch.testing.assert_close(hf(input_ids=x).logits, ours, rtol=0, atol=1e-4)


def test_xmoe_hf_from_pretrained_restores_the_threshold_routing(tmp_path):
    xmoe_hf = pytest.importorskip("xmoe.hf")
    if not hasattr(xmoe_hf, "from_pretrained"):
        pytest.skip("xmoe.hf.from_pretrained is not there yet")
    model = qwen_gpt("threshold", {"threshold": 0.7, "init_std": 0.5}, moe_every=1)
    out = export_model(model, tmp_path / "hf")
    assert hf_config(model)["num_experts_per_tok"] == 4  # no max_experts: k = E
    x = ids()
    hf = xmoe_hf.from_pretrained(str(out), backend="loop").eval()
    torch.testing.assert_close(hf(input_ids=x).logits, model(x).logits, rtol=0, atol=1e-4)


def _patch_with_xmoe_moe(hf):
    """Replace layer 1's Qwen3-MoE block by an xmoe MoE holding the same tensors, by hand (what
    xmoe.hf.from_pretrained does), so this test needs only export.py."""
    from xmoe import MoE

    block = hf.model.layers[1].mlp
    moe = MoE(16, 4, 8, router="topk", activation="swiglu", bias=False, backend="loop", k=3)
    with torch.no_grad():
        moe.router.weight = block.gate.weight
        h = 8
        gate_up = block.experts.gate_up_proj  # [E, 2h, d]
        moe.experts.w1.copy_(gate_up[:, :h].transpose(1, 2))
        moe.experts.w3.copy_(gate_up[:, h:].transpose(1, 2))
        moe.experts.w2.copy_(block.experts.down_proj.transpose(1, 2))
    hf.model.layers[1].mlp = moe
    return moe


@pytest.mark.filterwarnings("ignore:expert_choice routing")
@pytest.mark.parametrize(
    ("router", "options", "extra", "message"),
    [
        ("expert_choice", {}, {}, "no Qwen3-MoE equivalent"),
        ("topk", {"k": 2, "num_null_experts": 2}, {}, "null experts"),
        ("topk", {"k": 2, "loss_free_balance": True}, {}, "loss-free balancing"),
        ("topk", {"k": 2}, {"eval_capacity_factor": 1.0}, "eval_capacity_factor"),
        ("topk", {"k": 2}, {"shared_experts": 1}, "shared experts"),
    ],
)
def test_routers_without_an_hf_equivalent_are_refused(tmp_path, router, options, extra, message):
    model = qwen_gpt(router, options)
    for b in model.blocks:
        for k, v in extra.items():
            if k == "shared_experts" and hasattr(b.ffn, k):
                b.ffn.shared_experts = b.ffn.experts  # any Experts: the exporter must refuse
            elif hasattr(b.ffn, k):
                setattr(b.ffn, k, v)
    with pytest.raises(ValueError, match=message):
        export_model(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gpt_arch_is_refused_with_the_way_out():
    moe = MoEConfig(num_experts=4, d_expert=8, router="topk", router_options={"k": 2})
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16, moe=moe))
    with pytest.raises(ValueError, match="model.arch=qwen3_moe"):
        hf_config(model)


def test_export_writes_atomically_and_overwrites_only_an_export(tmp_path, tokenizer):
    model = qwen_gpt()
    out = export_model(model, tmp_path / "hf")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="--overwrite"):
        export_model(model, out)
    export_model(qwen_gpt(seed=5), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an export"):
        export_model(model, other, overwrite=True)
    assert (other / "a.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="tokenizer has"):
        export_model(qwen_gpt(vocab_size=257), tmp_path / "x", tokenizer)


def test_read_xmoe_section_rejects_a_foreign_section(tmp_path):
    assert read_xmoe_section({"model_type": "qwen3_moe"}) is None
    with pytest.raises(ValueError, match="format"):
        read_xmoe_section({SECTION: {"format": 99}})
    with pytest.raises(ValueError, match="no xmoe MoE"):
        section = {"format": 1, "layers": {"0": {"router": "threshold", "options": {}}}}
        restore_routing(torch.nn.Module(), section)
