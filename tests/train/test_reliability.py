"""Issue 17 items 2, 4, 5: one writer per run dir, validation before anything is written,
what --overwrite removes, and resume's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY
from xmoe.train import RunDir, load_config, load_run, train
from xmoe.train.run_dir import MARKER
from xmoe.train.run_lock import RunLock, RunLockedError


def _cfg(corpus, *extra):
    return load_config(None, [*TINY, f"data.path={corpus}", "train.eval_every=100", *extra])


def _names(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_a_second_writer_is_refused_at_once_naming_the_pid(tmp_path):
    with RunLock(tmp_path / "run"):
        started = time.perf_counter()
        with pytest.raises(
            RunLockedError, match=f"in use by another xmoe process \\(pid {os.getpid()}"
        ):
            RunLock(tmp_path / "run").acquire()
        assert time.perf_counter() - started < 1.0
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = (
        "import sys, time; from xmoe.train.run_lock import RunLock; "
        f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert f"pid {proc.pid}" in (tmp_path / "run" / ".lock").read_text()  # the file stays behind
    lock = RunLock(tmp_path / "run").acquire()  # ...and is taken over
    assert f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()
    lock.release()


def test_train_overwrite_and_resume_are_refused_while_a_run_holds_the_lock(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    train(_cfg(corpus, "train.steps=2"), run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.name != ".lock"}
    with RunLock(run.path):  # another process would hold it for its run's lifetime
        for kwargs in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunLockedError, match="in use"):
                train(_cfg(corpus, "train.steps=3"), run, progress=False, **kwargs)
    after = {p: p.stat().st_mtime_ns for p in run.path.rglob("*") if p.name != ".lock"}
    assert after == before  # nothing touched


def test_a_corpus_too_small_to_train_on_leaves_no_run_dir(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be or not to be.\n" * 3)
    run = tmp_path / "runs" / "r"
    with pytest.raises(
        ValueError, match="training split has .* tokens, fewer than model.block_size"
    ):
        train(_cfg(tiny, "train.steps=2"), run, progress=False)
    assert not run.exists() and (tmp_path / "runs").exists()
    run.mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(ValueError, match="training split"):
        train(_cfg(tiny, "train.steps=2"), run, progress=False)
    assert run.is_dir() and _names(run) == set()


def test_a_validation_split_too_small_for_one_block_is_found_at_start_up(tmp_path, corpus):
    run = tmp_path / "r"
    with pytest.raises(ValueError, match=r"validation split \(data.val_fraction=0.0001\) has"):
        train(_cfg(corpus, "train.steps=50", "data.val_fraction=0.0001"), run, progress=False)
    assert not run.exists()  # found before the first step, not after training


def test_a_resume_that_changes_shapes_is_refused_before_config_yaml_is_rewritten(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    train(_cfg(corpus, "train.steps=2"), run, progress=False)
    config_before = run.config_path.read_bytes()
    metrics_before = run.metrics_path.read_bytes()
    wider = run.load_config({"model.moe.d_expert": 12, "train.steps": 4})
    with pytest.raises(ValueError, match="does not match the model config"):
        train(wider, run, resume=True, progress=False)
    assert run.config_path.read_bytes() == config_before
    assert run.metrics_path.read_bytes() == metrics_before
    load_run(run).evaluate(max_tokens=64)  # still evaluable...
    summary = train(run.load_config({"train.steps": 3}), run, resume=True, progress=False)
    assert summary["steps"] == 3  # ...and resumable


def test_resume_writes_each_step_and_one_final_line(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    cfg = _cfg(corpus, "train.steps=3", "train.eval_every=2")
    train(cfg, run, progress=False)
    train(run.load_config({"train.steps": 5}), run, resume=True, progress=False)
    train(run.load_config({"train.steps": 5}), run, resume=True, progress=False)  # nothing to do
    records = run.read_metrics()
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5]
    finals = [r for r in records if r.get("final")]
    assert len(finals) == 1 and finals[0]["step"] == 5
    assert [r["step"] for r in records if r["split"] == "val" and not r.get("final")] == [2, 4]


def test_overwrite_removes_the_whole_run_including_the_token_cache(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    train(_cfg(corpus, "train.steps=2"), run, progress=False)
    (run.path / "notes.txt").write_text("mine")  # inside an xmoe run: part of the run
    old_val = np.load(run.data_dir / "tokens.npz")["val"]
    summary = train(
        _cfg(corpus, "train.steps=2", "data.val_fraction=0.2"), run, overwrite=True, progress=False
    )
    new_val = np.load(run.data_dir / "tokens.npz")["val"]
    assert len(new_val) > 2 * len(old_val)  # the new val_fraction is not ignored
    assert summary["val_tokens"] != 0 and not (run.path / "notes.txt").exists()
    assert _names(run.path) >= {MARKER, "config.yaml", "checkpoint", "data", "metrics.jsonl"}
    assert not any(n.startswith(".overwritten") for n in _names(run.path))


def test_overwrite_refuses_a_folder_that_is_not_an_xmoe_run(tmp_path, corpus):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not an xmoe run"):
        train(_cfg(corpus, "train.steps=2"), folder, overwrite=True, progress=False)
    assert _names(folder) == {"chapter1.tex"}
    assert (folder / "chapter1.tex").read_text() == "precious"


def test_an_overwrite_that_fails_at_start_up_puts_the_old_run_back(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    train(_cfg(corpus, "train.steps=2"), run, progress=False)
    files = {p.relative_to(run.path): p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too small\n")
    with pytest.raises(ValueError, match="training split"):
        train(_cfg(tiny, "train.steps=2"), run, overwrite=True, progress=False)
    after = {p.relative_to(run.path): p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    lock = after.pop(type(next(iter(after)))(".lock"), None)
    files.pop(type(next(iter(files)))(".lock"), None)
    assert lock is not None and after == files


def test_resume_falls_back_to_the_previous_checkpoint_and_sets_the_bad_one_aside(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    train(_cfg(corpus, "train.steps=4", "train.checkpoint_every=2"), run, progress=False)
    assert json.loads((run.path / "checkpoint.prev" / "state.json").read_text())["step"] == 2
    model = run.path / "checkpoint" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-64:] = bytes(64)
    model.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="falling back to .*checkpoint.prev \\(step 2\\)"):
        summary = train(run.load_config({"train.steps": 5}), run, resume=True, progress=False)
    assert summary["steps"] == 5
    assert (run.path / "checkpoint.corrupt").is_dir()
    assert [r["step"] for r in run.read_metrics() if r["split"] == "train"] == [1, 2, 3, 4, 5]
