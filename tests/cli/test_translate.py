"""``xmoe train --task translate`` → ``xmoe translate``, end to end on a tiny corpus."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from xmoe.cli.main import main

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_translate_task import tiny_corpus  # noqa: E402

pytest.importorskip("sacrebleu")

SETS = [
    "model.vocab_size=300",
    "model.block_size=24",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.d_ff=64",
    "model.moe_every=2",
    "model.moe.num_experts=4",
    "model.moe.d_expert=16",
    "model.dropout=0.0",
    "train.steps=40",
    "train.batch_size=16",
    "train.warmup_steps=5",
    "train.eval_every=1000",
    "train.checkpoint_every=0",
    "train.threads=1",
    "task_options.eval_sentences=8",
    "task_options.beam=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    corpus = tiny_corpus(root / "corpus")
    args = ["train", "--task", "translate", "--run-dir", str(root / "run"), "--no-progress"]
    for s in [*SETS, f"task_options.corpus_cache={corpus}"]:
        args += ["--set", s]
    assert main(args) == 0
    assert (root / "run" / "summary.json").exists()
    return root / "run"


def test_translate_a_file_one_line_per_line(run, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("Loue vnto heauen night\n\nGiue deere sonne eyes\n")
    out = tmp_path / "out.txt"
    assert main(["translate", str(run), "--input", str(src), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == "" and lines[0] and lines[2]


def test_translate_reads_stdin(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Haue selfe loue\n"))
    assert main(["translate", str(run), "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_empty_input_is_a_clear_error(run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["translate", str(run), "--input", str(empty)]) == 2
    assert "holds no text to translate" in capsys.readouterr().err


def test_a_source_over_block_size_fails_clearly_or_is_truncated(run, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("Loue " * 60 + "\nGiue\n")
    assert main(["translate", str(run), "--input", str(long)]) == 2
    err = capsys.readouterr().err
    assert "input line 1 has" in err and "--truncate" in err
    assert main(["translate", str(run), "--input", str(long), "--truncate"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_not_a_translate_run_and_missing_input_are_errors(run, tmp_path, capsys):
    assert main(["translate", str(tmp_path / "nothing"), "--input", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err
    f = tmp_path / "x.txt"
    f.write_text("Loue\n")
    assert main(["translate", str(tmp_path / "nothing"), "--input", str(f)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_translate_compare_runs_rows_and_skips_finished_runs_on_rerun(tmp_path, capsys):
    out = tmp_path / "grid"
    tiny_corpus(out / "corpus")  # the grid's shared corpus cache, so nothing is aligned here
    small = [s for s in SETS if not s.startswith(("train.steps", "model.moe"))]
    args = ["translate-compare", "--seeds", "1", "--rows", "dense,xmoe16", "--steps", "6"]
    args += ["--out", str(out), "--no-progress"]
    for s in [*small, "model.moe.d_expert=16"]:
        args += ["--set", s]
    assert main(args) == 0
    table = (out / "results.md").read_text()
    assert "| dense |" in table and "| xmoe16 |" in table and "| copy |" in table
    summary = out / "runs" / "dense-s0" / "summary.json"
    before = summary.stat().st_mtime_ns
    assert main(args) == 0  # resumable: finished runs are skipped
    assert summary.stat().st_mtime_ns == before
