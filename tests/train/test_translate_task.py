"""The translate task on a small hand-made corpus: batches, loss, evaluation, summary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from xmoe.data.parallel import CACHE_VERSION, AlignOptions, Pair
from xmoe.train.config import load_config
from xmoe.train.translate_task import TranslateTask

pytest.importorskip("sacrebleu")

WORDS = ["loue", "heauen", "vnto", "giue", "haue", "selfe", "deere", "sonne", "eyes", "night"]


def modern(word: str) -> str:
    return {
        "loue": "love",
        "heauen": "heaven",
        "vnto": "unto",
        "giue": "give",
        "haue": "have",
        "selfe": "self",
        "deere": "dear",
        "sonne": "son",
    }.get(word, word)


def tiny_corpus(folder: Path, n_train: int = 300, seed: int = 0) -> Path:
    """A parallel.json cache of Folio-like → modern word sequences (a learnable mapping)."""
    g = torch.Generator().manual_seed(seed)

    def pairs(n, work):
        out = []
        for _ in range(n):
            ws = [WORDS[i] for i in torch.randint(0, len(WORDS), (4,), generator=g).tolist()]
            out.append(
                Pair(" ".join(ws).capitalize(), " ".join(map(modern, ws)).capitalize(), work, 1.0)
            )
        return out

    splits = {"train": pairs(n_train, "a"), "val": pairs(20, "b"), "test": pairs(20, "c")}
    key = {"version": CACHE_VERSION, "options": asdict(AlignOptions())}
    payload = {"key": key, "splits": {s: [asdict(p) for p in v] for s, v in splits.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parallel.json").write_text(json.dumps(payload))
    return folder


def tiny_config(corpus: Path, **extra):
    layer = {
        "task": "translate",
        "model.vocab_size": 300,
        "model.block_size": 24,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 32,
        "model.d_ff": 64,
        "model.moe_every": 2,
        "model.moe.num_experts": 4,
        "model.moe.d_expert": 16,
        "model.moe.router_options": {"threshold": 0.9},
        "model.dropout": 0.0,
        "train.steps": 30,
        "train.batch_size": 16,
        "train.lr": 3e-3,
        "train.warmup_steps": 5,
        "train.eval_every": 20,
        "train.eval_tokens": 200,
        "train.eval_batch_size": 16,
        "train.log_every": 10,
        "train.checkpoint_every": 0,
        "train.threads": 1,
        "task_options.corpus_cache": str(corpus),
        "task_options.eval_sentences": 10,
        "task_options.beam": 2,
        **extra,
    }
    return load_config(None, layer)


def test_batches_are_a_pure_function_of_the_step_and_well_formed(tmp_path):
    cfg = tiny_config(tiny_corpus(tmp_path / "c"))
    task = TranslateTask(cfg)
    model = task.build_model(0)
    task.setup(tmp_path / "data", model)
    assert (tmp_path / "data" / "parallel.json").exists()  # copied into the run's data dir
    src, tgt_in, tgt_out = task.train_batch(3)
    again = task.train_batch(3)
    assert all(torch.equal(a, b) for a, b in zip((src, tgt_in, tgt_out), again))
    assert not torch.equal(src, task.train_batch(4)[0])
    c = task.model_cfg
    assert (tgt_in[:, 0] == c.bos_id).all()
    body = (tgt_out[:, :-1] != c.pad_id) & (tgt_out[:, :-1] != c.eos_id)
    assert torch.equal(tgt_in[:, 1:][body], tgt_out[:, :-1][body])  # shifted by one
    assert ((tgt_out == c.eos_id).sum(1) == 1).all() and ((src == c.eos_id).sum(1) == 1).all()
    out = task.loss(model, (src, tgt_in, tgt_out))
    assert out.loss.dim() == 0 and len(out.routings) == 1
    assert task.data_stats["train"]["pairs"] == 300


def test_training_lowers_the_loss_and_the_summary_has_the_scores(tmp_path):
    from xmoe.train.loop import train

    cfg = tiny_config(tiny_corpus(tmp_path / "c"), **{"train.steps": 60})
    summary = train(cfg, tmp_path / "run", progress=False)
    metrics = [
        json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_nll = [m["nll"] for m in metrics if m["split"] == "train"]
    assert train_nll[-1] < train_nll[0] - 1.0
    for key in ("test_bleu", "test_chrf", "test_copy_bleu", "val_bleu", "val_loss"):
        assert 0.0 <= summary[key] <= 100.0 or key == "val_loss"
    assert len(summary["experts_per_token_per_layer"]) == 1
    assert 1.0 <= summary["experts_per_token_per_layer"][0] <= 4.0
    assert summary["enc_moe_flops_per_token"] > 0
    assert summary["test_sentences"] == 10


def test_options_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match="task_options.beam"):
        tiny_config(tmp_path, **{"task_options.beam": 0})
    with pytest.raises(ValueError, match="task_options.bogus"):
        tiny_config(tmp_path, **{"task_options.bogus": 1})
    with pytest.raises(ValueError, match="min_similarity"):
        tiny_config(tmp_path, **{"task_options.min_similarity": 2.0})


def test_pairs_longer_than_block_size_are_left_out_and_counted(tmp_path):
    cfg = tiny_config(tiny_corpus(tmp_path / "c"), **{"model.block_size": 8})
    task = TranslateTask(cfg)
    task.setup(tmp_path / "data", task.build_model(0))
    stats = task.data_stats["train"]
    assert stats["too_long"] > 0 and stats["pairs"] + stats["too_long"] == 300
    assert all(len(s) <= 8 for s in task.splits["train"].src)
