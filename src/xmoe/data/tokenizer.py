"""Byte-level BPE tokenizer (``tokenizers``), trained on the training split and cached as JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .._io import atomic_write

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (>= 257: bytes + end-of-text)."""
    if vocab_size < 257:
        raise ValueError(f"data.vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_or_train_tokenizer(path: Path, texts: list[str], vocab_size: int) -> Tokenizer:
    """Load ``path`` if it exists (and has the right vocab size), else train and save it."""
    if path.exists():
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() == vocab_size:
            return tok
    tok = train_tokenizer(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.to_str())
    return tok


def encode(tok: Tokenizer, text: str, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Encode a long text as int32 ids, in line-aligned chunks (batch-encoded in parallel)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        nl = text.rfind("\n", start, end)
        end = nl + 1 if (nl > start and end < len(text)) else end
        chunks.append(text[start:end])
        start = end
    ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(chunks)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
