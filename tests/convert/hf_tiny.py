"""Tiny random Hugging Face models and batches shared by the conversion tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xmoe.convert import ConvertConfig, convert_model  # noqa: E402

D, D_FF, LAYERS, VOCAB = 16, 32, 2, 50
# Large init: FFN pre-activations of order 1, where GELU variants differ (GPT-2's tanh GELU vs
# the exact one by up to ~1e-3), so an exactness test would catch the wrong activation.
INIT = 0.3


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=32,
        initializer_range=INIT,
    )
    return transformers.BertModel(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_layer=LAYERS,
        n_head=2,
        n_inner=D_FF,
        n_positions=32,
        initializer_range=INIT,
    )
    return transformers.GPT2Model(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=32,
        initializer_range=INIT,
    )
    return transformers.LlamaModel(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def random_batches(n_batches=3, batch=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2 :] = 0  # some padding: captured rows must skip it
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def converted(name, split="coact", experts=4, steps=20, **kw):
    model = MODELS[name]()
    batches = random_batches()
    dense_out = hidden(model, batches[0])
    cfg = ConvertConfig(num_experts=experts, split=split, calib_tokens=64, router_steps=steps, **kw)
    manifest = convert_model(model, cfg, batches)
    return model, dense_out, batches, manifest


def save_local_bert(path):
    """A 1-layer BERT with a word-level tokenizer saved to ``path`` (a local base model dir)."""
    path.mkdir(parents=True)
    words = [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "that",
        "is",
        "it",
        "you",
        "my",
        "with",
        "not",
        "his",
        "be",
        "your",
        "for",
        "this",
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=160,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
