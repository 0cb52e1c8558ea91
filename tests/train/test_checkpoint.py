"""Issue 17 item 3: checksummed checkpoints, verified on load, the previous one kept as a
fallback, files and folders flushed before each rename, consistent snapshots for readers."""

from __future__ import annotations

import json
import os

import pytest
import torch

import xmoe.train.checkpoint as ck
from xmoe.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(run, step: int, seed: int = 0):
    model, opt = _model_and_opt(seed)
    save_checkpoint(run, model, opt, {"step": step, "tokens_seen": step * 10})
    return model


def _flip(path, offset: int = -20, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_records_the_sha256_and_size_of_every_file(tmp_path):
    _save(tmp_path, 3)
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == set(ck.FILES)
    import hashlib

    for name, entry in manifest["files"].items():
        data = (tmp_path / "checkpoint" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no tmp left


@pytest.mark.parametrize(
    "damage",
    ["flip_model", "flip64_optimizer", "truncate_model", "garble_state", "empty_state", "delete"],
)
def test_a_damaged_file_is_a_clear_error_naming_it(tmp_path, damage):
    _save(tmp_path, 1)
    c = tmp_path / "checkpoint"
    name = {
        "flip_model": "model.safetensors",
        "flip64_optimizer": "optimizer.safetensors",
        "truncate_model": "model.safetensors",
        "garble_state": "state.json",
        "empty_state": "state.json",
        "delete": "optimizer.safetensors",
    }[damage]
    if damage == "flip_model":
        _flip(c / name)
    elif damage == "flip64_optimizer":
        _flip(c / name, offset=-100, count=64)
    elif damage == "truncate_model":
        (c / name).write_bytes((c / name).read_bytes()[:50])
    elif damage == "garble_state":
        (c / name).write_text('{"step": 1, "optimizer": ')
    elif damage == "empty_state":
        (c / name).write_text("")
    else:
        (c / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_checkpoint(c)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_checkpoint(tmp_path)


def test_the_previous_checkpoint_is_kept_and_used_when_the_newest_fails(tmp_path):
    _save(tmp_path, 1, seed=1)
    assert resolve_checkpoint(tmp_path).step == 1
    _save(tmp_path, 2, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.prev"]
    assert resolve_checkpoint(tmp_path).step == 2
    _flip(tmp_path / "checkpoint" / "model.safetensors")
    with pytest.warns(
        UserWarning, match=r"model\.safetensors fails its SHA-256 check.*falling back"
    ):
        snapshot = resolve_checkpoint(tmp_path)
    assert snapshot.step == 1 and snapshot.path.name == "checkpoint.prev"
    model, opt = _model_and_opt(seed=9)
    state = load_checkpoint(snapshot, model, opt)
    expected, _ = _model_and_opt(seed=1)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    assert state == {"step": 1, "tokens_seen": 10}
    # a third save keeps one good previous checkpoint again
    ck.set_aside_corrupt(tmp_path)
    _save(tmp_path, 3, seed=3)
    assert resolve_checkpoint(tmp_path).step == 3
    assert read_checkpoint(tmp_path / "checkpoint.prev").step == 1


def test_files_and_folders_are_flushed_before_each_rename(tmp_path, monkeypatch):
    events = []
    real_file, real_dir, real_rename = ck.fsync_file, ck.fsync_dir, type(tmp_path).rename
    monkeypatch.setattr(ck, "fsync_file", lambda p: (events.append(("file", p.name)), real_file(p)))
    monkeypatch.setattr(ck, "fsync_dir", lambda p: (events.append(("dir", p.name)), real_dir(p)))
    real_os_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fd", fd)), real_os_fsync(fd)))

    def rename(self, target):
        events.append(("rename", self.name))
        return real_rename(self, target)

    monkeypatch.setattr(type(tmp_path), "rename", rename)
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    second = events[len(events) // 2 :]
    first_rename = next(i for i, e in enumerate(second) if e[0] == "rename")
    flushed = {e[1] for e in second[:first_rename] if e[0] == "file"}
    assert flushed == set(ck.FILES)  # every file, then the manifest (by fd) and the tmp folder
    assert ("dir", "checkpoint.tmp") in second[:first_rename]
    assert [e[1] for e in second if e[0] == "rename"] == ["checkpoint", "checkpoint.tmp"]
    last_rename = max(i for i, e in enumerate(second) if e[0] == "rename")
    assert ("dir", tmp_path.name) in second[last_rename:]  # the run folder after the renames


def test_a_reader_gets_one_consistent_snapshot_while_a_writer_swaps(tmp_path, monkeypatch):
    _save(tmp_path, 1, seed=1)
    real_read_at = ck._read_at
    swapped = []

    def read_at(fd, name):
        data = real_read_at(fd, name)
        if not swapped:  # a writer swaps in step 2 after the reader's first file
            swapped.append(True)
            _save(tmp_path, 2, seed=2)
        return data

    monkeypatch.setattr(ck, "_read_at", read_at)
    snapshot = read_checkpoint(tmp_path / "checkpoint")
    assert snapshot.step == 1  # all files from the folder it opened (now checkpoint.prev)


def test_a_checkpoint_of_an_older_xmoe_without_manifest_still_loads(tmp_path):
    _save(tmp_path, 4)
    (tmp_path / "checkpoint" / "manifest.json").unlink()
    assert resolve_checkpoint(tmp_path).step == 4


def test_shapes_that_do_not_match_are_refused_by_name(tmp_path):
    _save(tmp_path, 1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"does not match the model config.*0\.weight"):
        ck.load_weights(tmp_path / "checkpoint", other)
