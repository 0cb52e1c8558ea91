"""Shakespeare passages labelled by work and by genre: the data of the early-exit task.

A passage is ``lines`` consecutive lines of text from one work. Lines that are not the text
itself are dropped first: speaker headings (``Ber.``, ``KING HENRY.``), stage directions
(``[Exit.]``), act/scene headings, all-capital titles and bare numerals (sonnet numbers); a
speaker heading would otherwise give the work away by a character's name alone.

Splits go by position inside each work, so no line is shared: the first ``train_fraction`` of a
work's passages train, the next ``val_fraction`` validate, the rest test. ``max_per_work`` caps
the passages taken per work (evenly spaced inside each split), so the frozen backbone's
features stay cheap to compute. The work -> genre table is ``genres.tsv`` (its source is named
in the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .._checks import check_int, check_range
from .corpus import Document

GENRES = ("comedy", "history", "tragedy", "poem")
SPLITS = ("train", "val", "test")
GENRE_TABLE = Path(__file__).with_name("genres.tsv")

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.$")  # "Ber.", "First Lord."
_NUMERAL = re.compile(r"^[IVXLC]+\.?$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")


@dataclass
class Passage:
    text: str
    work: int  # index into Passages.works
    genre: int  # index into GENRES
    split: str  # train | val | test
    position: int  # index of the passage's first kept line inside its work


@dataclass
class Passages:
    works: list[str]
    items: list[Passage]

    def split(self, name: str) -> list[Passage]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [p for p in self.items if p.split == name]


def read_genres(path: Path = GENRE_TABLE) -> dict[str, str]:
    """The work -> genre table (``#`` comments and the header row skipped)."""
    table: dict[str, str] = {}
    for line in path.read_text("utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        work, genre = line.split("\t")
        if work == "work":
            continue
        if genre not in GENRES:
            raise ValueError(f"{path}: genre of {work!r} must be one of {GENRES}, got {genre!r}")
        table[work] = genre
    return table


def text_lines(text: str) -> list[str]:
    """The lines of a work that are its text (headings and stage directions dropped)."""
    kept = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("[") or _HEADING.match(line) or _NUMERAL.match(line):
            continue
        if _SPEAKER.match(line) or (line.upper() == line and any(c.isalpha() for c in line)):
            continue
        kept.append(line)
    return kept


def split_of(index: int, count: int, train_fraction: float, val_fraction: float) -> str:
    """The split of passage ``index`` of ``count`` (by position)."""
    if index < round(count * train_fraction):
        return "train"
    if index < round(count * (train_fraction + val_fraction)):
        return "val"
    return "test"


def build_passages(
    docs: list[Document],
    lines: int = 4,
    max_per_work: int | None = 200,
    train_fraction: float = 0.7,
    val_fraction: float = 0.15,
    genres: dict[str, str] | None = None,
) -> Passages:
    """Non-overlapping passages of ``lines`` kept lines from every document, split by position.

    Every document needs a genre in ``genres`` (default: the shipped table).
    """
    check_int("lines", lines, 1)
    if max_per_work is not None:
        check_int("max_per_work", max_per_work, 3)
    check_range("train_fraction", train_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_range("val_fraction", val_fraction, 0.0, 1.0 - train_fraction, low_open=True)
    table = read_genres() if genres is None else genres
    missing = [d.name for d in docs if d.name not in table]
    if missing:
        raise ValueError(f"no genre for works {missing} in the genre table")
    works = [d.name for d in docs]
    items: list[Passage] = []
    for w, doc in enumerate(docs):
        kept = text_lines(doc.text)
        starts = list(range(0, len(kept) - lines + 1, lines))
        genre = GENRES.index(table[doc.name])
        by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i, start in enumerate(starts):
            by_split[split_of(i, len(starts), train_fraction, val_fraction)].append(start)
        for split, chosen in by_split.items():
            if max_per_work is not None:
                share = {"train": train_fraction, "val": val_fraction}
                cap = max(
                    1, round(max_per_work * share.get(split, 1 - train_fraction - val_fraction))
                )
                chosen = _evenly(chosen, cap)
            for start in chosen:
                text = "\n".join(kept[start : start + lines])
                items.append(Passage(text, w, genre, split, start))
    return Passages(works, items)


def _evenly(values: list[int], k: int) -> list[int]:
    """At most ``k`` of ``values``, evenly spaced (all of them when there are fewer)."""
    if len(values) <= k:
        return values
    step = len(values) / k
    return [values[int(i * step)] for i in range(k)]
