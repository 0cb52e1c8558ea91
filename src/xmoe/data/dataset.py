"""Token streams for LM training: deterministic random windows (train) and fixed windows (eval)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .._io import atomic_write
from .corpus import load_documents, split_documents
from .tokenizer import encode, load_or_train_tokenizer


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray  # int32 token ids
    val: np.ndarray

    def train_batch(self, step: int, batch_size: int, block_size: int, seed: int):
        """Random windows for ``step``; a pure function of (seed, step), so resume is exact."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        high = len(self.train) - block_size - 1
        if high <= 0:
            raise ValueError(
                f"training split has {len(self.train)} tokens, fewer than block_size + 2"
            )
        starts = torch.randint(0, high, (batch_size,), generator=g).numpy()
        return _windows(self.train, starts, block_size)

    def val_batches(self, batch_size: int, block_size: int, max_tokens: int | None):
        """Non-overlapping windows from the start of the val split, always the same ones."""
        n_windows = (len(self.val) - 1) // block_size
        if max_tokens is not None:
            n_windows = min(n_windows, max(1, max_tokens // block_size))
        if n_windows <= 0:
            raise ValueError(f"validation split has {len(self.val)} tokens, < block_size + 1")
        starts = np.arange(n_windows) * block_size
        for i in range(0, n_windows, batch_size):
            yield _windows(self.val, starts[i : i + batch_size], block_size)

    def unigram_ppl(self) -> float:
        """Perplexity on val of the add-one unigram model fitted on train (a floor to beat)."""
        vocab = self.tokenizer.get_vocab_size()
        counts = np.bincount(self.train, minlength=vocab).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(np.exp(-logp[self.val].mean()))


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int):
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def prepare_data(
    cache_dir: Path, data_path: str | None, vocab_size: int, val_fraction: float
) -> TokenData:
    """Load the corpus, split it, train/cache the tokenizer and token arrays in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_path = cache_dir / "tokenizer.json"
    arrays = cache_dir / "tokens.npz"
    if tok_path.exists() and arrays.exists():
        tok = Tokenizer.from_file(str(tok_path))
        if tok.get_vocab_size() == vocab_size:
            with np.load(arrays) as z:
                return TokenData(tok, z["train"], z["val"])
    train_text, val_text = split_documents(load_documents(data_path), val_fraction)
    tok = load_or_train_tokenizer(tok_path, [train_text], vocab_size)
    data = TokenData(tok, encode(tok, train_text), encode(tok, val_text))
    buffer = io.BytesIO()
    np.savez(buffer, train=data.train, val=data.val)
    atomic_write(arrays, buffer.getvalue())
    return data
