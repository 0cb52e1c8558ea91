"""xmoe.hf.patch / from_pretrained: the patched model gives the HF logits, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_moe_tiny import FAMILIES, VOCAB, tiny_model, token_batch, transformers

import xmoe.hf as xh
from xmoe.hf import HFMoE
from xmoe.hf.routing import restore_threshold_section


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_logits_equal_hf(family):
    model = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        patched = copy.deepcopy(model)
        blocks = xh.patch(patched)
        got = patched(input_ids=ids).logits
    assert len(blocks) == 2 and all(isinstance(b, HFMoE) for b in blocks)
    assert [b.layer_index for b in blocks] == [0, 1]
    assert (got - ref).abs().max() < 1e-5
    assert xh.patch(patched) == blocks  # patching twice changes nothing


def test_only_sparse_layers_are_replaced():
    model = tiny_model("qwen3_moe", decoder_sparse_step=2, num_hidden_layers=4)
    blocks = xh.patch(model)
    assert len(blocks) == 2
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert model.model.layers[1].mlp is blocks[0]


def test_unsupported_model_names_itself_and_the_supported_list():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError) as err:
        xh.patch(model)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    for name in xh.SUPPORTED_MODELS:
        assert name in msg


def test_from_pretrained_loads_a_saved_model_and_equals_it(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    ids = token_batch(1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        loaded = xh.from_pretrained(tmp_path)
        got = loaded(input_ids=ids).logits
    assert len(xh.moe_blocks(loaded)) == 2
    assert (got - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="hf_kwargs"):
        xh.from_pretrained(loaded, dtype=torch.float32)


def test_threshold_section_reader_sets_the_threshold_rule():
    model = tiny_model("qwen3_moe", num_experts_per_tok=8, norm_topk_prob=False)
    xh.patch(model)
    section = {"router": "threshold", "router_options": {"threshold": 0.6, "max_experts": 3}}
    restore_threshold_section(model, section)
    state = xh.routing_state(model)
    assert [(s["selection"], s["threshold"], s["max_experts"]) for s in state] == [
        ("threshold", 0.6, 3)
    ] * 2
    restore_threshold_section(model, {"router": "threshold", "thresholds": [0.5, 0.7]})
    assert [s["threshold"] for s in xh.routing_state(model)] == [0.5, 0.7]
    with pytest.raises(ValueError, match="expert_choice"):
        restore_threshold_section(model, {"router": "expert_choice"})


def test_generate_runs_with_threshold_routing():
    model = tiny_model("olmoe")
    xh.patch(model)
    xh.set_routing(model, "threshold", threshold=0.5)
    out = model.generate(token_batch(2, batch=1, length=4), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_copied_contiguous_weights_give_the_same_logits(family):
    model = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        blocks = xh.patch(model, share=False)
        got = model(input_ids=ids).logits
    ex = blocks[0].experts
    assert ex.w1.is_contiguous() and ex.w2.is_contiguous() and ex.w3.is_contiguous()
    assert blocks[0].shared_experts.w1.is_contiguous()
    assert (got - ref).abs().max() < 1e-5


def test_hf_modules_import_each_other_without_a_circle():
    """The relative imports inside xmoe.hf (all of them, lazy ones too) form no cycle."""
    import ast
    from pathlib import Path

    import xmoe.hf

    graph = {}
    for f in Path(xmoe.hf.__file__).parent.glob("*.py"):
        nodes = ast.walk(ast.parse(f.read_text()))
        graph[f.stem] = {
            n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 1
        }
    assert {"block", "restore"} <= graph["patch"] and "patch" not in graph["routing"]

    def reaches(start, goal, seen=()):
        return any(
            d == goal or (d not in seen and reaches(d, goal, (*seen, d)))
            for d in graph.get(start, ())
        )

    assert [m for m in graph if reaches(m, m)] == []
