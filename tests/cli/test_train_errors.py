"""Issue 17 items 1-5 through the CLI: a user's mistake exits 2 with one line naming the file
or key, never a traceback; eval/generate verify checkpoints; a second writer is refused."""

from __future__ import annotations

import os

import pytest

from conftest import sets
from xmoe.cli import main
from xmoe.train.run_lock import RunLock


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("xmoe ")
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def trained(tmp_path, corpus):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--data", corpus, "--no-progress"]
    assert (
        main(args + sets("train.steps=4", "train.checkpoint_every=2", "train.eval_every=100")) == 0
    )
    return run


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.activation=foo", "model.activation"),
        ("model.moe.loss_coefs.z_loss=abc", "model.moe.loss_coefs.z_loss"),
        ("model.moe.loss_coefs.bogus=1", "model.moe.loss_coefs.bogus"),
        ("train.time_limit_s=-5", "train.time_limit_s"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.grad_clip=.nan", "train.grad_clip"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("model.moe_every=3", "model.moe_every"),
        ("model.moe.num_experts=0", "model.moe.num_experts"),
        ("train.lr=[1,", "invalid YAML"),
        ("model.block_size=100000", "model.block_size"),
        ("data.val_fraction=0.00001", "validation split"),
    ],
)
def test_bad_overrides_exit_2_with_one_line_naming_the_key(
    tmp_path, corpus, capsys, override, needle
):
    run = tmp_path / "r"
    code = main(
        ["train", "--run-dir", str(run), "--data", corpus, "--no-progress"] + sets(override)
    )
    assert code == 2
    _one_error_line(capsys, "xmoe train: error:", needle)
    assert not run.exists()  # refused before anything was written


def test_yaml_1_1_floats_are_accepted(tmp_path, corpus, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 3e-3\n  steps: 1\n")
    args = ["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--data", corpus]
    assert main(args + ["--no-progress"] + sets("train.min_lr_ratio=1e-1")) == 0


def test_file_and_folder_mistakes(tmp_path, corpus, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 1\n  lr: : 3\n")
    base = ["train", "--data", corpus, "--no-progress"]
    assert main(base + ["--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "bad.yaml", "line 3", "invalid YAML")
    assert main(base + ["--config", str(tmp_path), "--run-dir", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "is not a file")
    (tmp_path / "afile").write_text("x")
    assert main(base + ["--run-dir", str(tmp_path / "afile")] + sets("train.steps=1")) == 2
    _one_error_line(capsys, "afile", "is a file")
    assert main(["eval", str(tmp_path / "afile")]) == 2
    _one_error_line(capsys, "is a file")
    assert (
        main(base + ["--run-dir", str(tmp_path / "r2"), "--data", str(tmp_path / "nope.txt")]) == 2
    )
    _one_error_line(capsys, "nope.txt")


def test_compare_with_no_router_names(capsys):
    assert main(["compare", "--routers", ","]) == 2
    _one_error_line(capsys, "--routers names no router")


def test_eval_and_generate_verify_the_checkpoint(trained, capsys):
    for name in ("checkpoint", "checkpoint.prev"):
        model = trained / name / "model.safetensors"
        model.write_bytes(model.read_bytes()[:-10])  # truncated
    assert main(["eval", str(trained), "--max-tokens", "32"]) == 2
    _one_error_line(capsys, "model.safetensors", "fails its SHA-256 check", "no usable checkpoint")
    assert main(["generate", str(trained), "--max-new-tokens", "2"]) == 2
    _one_error_line(capsys, "model.safetensors")
    assert main(["train", "--run-dir", str(trained), "--resume", "--no-progress"]) == 2
    _one_error_line(capsys, "no usable checkpoint")


def test_a_bad_state_json_is_named(trained, capsys):
    (trained / "checkpoint" / "state.json").write_text("{not json")
    (trained / "checkpoint.prev" / "state.json").write_text("{}")
    assert main(["eval", str(trained), "--max-tokens", "32"]) == 2
    _one_error_line(capsys, "state.json")


def test_eval_falls_back_to_the_previous_checkpoint_with_a_warning(trained, capsys):
    model = trained / "checkpoint" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    model.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="falling back"):
        assert main(["eval", str(trained), "--max-tokens", "32"]) == 0


def test_a_second_writer_is_refused_naming_the_pid(trained, corpus, capsys):
    before = (trained / "metrics.jsonl").read_bytes()
    with RunLock(trained):
        for flag in ("--overwrite", "--resume"):
            args = ["train", "--run-dir", str(trained), flag, "--no-progress"]
            if flag == "--overwrite":
                args += ["--data", corpus] + sets("train.steps=1")
            assert main(args) == 2
            _one_error_line(capsys, "in use by another xmoe process", f"pid {os.getpid()}")
        assert main(["eval", str(trained), "--max-tokens", "32"]) == 0  # readers take no lock
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, corpus, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    args = ["train", "--run-dir", str(tmp_path), "--overwrite", "--data", corpus, "--no-progress"]
    assert main(args + sets("train.steps=1")) == 2
    _one_error_line(capsys, "is not an xmoe run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "{run}", "--temperature", "nan"], "--temperature"),
        (["generate", "{run}", "--temperature", "0"], "--temperature"),
        (["generate", "{run}", "--top-k", "0"], "--top-k"),
        (["generate", "{run}", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["eval", "{run}", "--threshold", "nan"], "threshold"),
        (["eval", "{run}", "--max-tokens", "0"], "--max-tokens"),
        (["eval", "{run}", "--set", "model.d_model=32"], "does not match the model config"),
    ],
)
def test_eval_and_generate_arguments(trained, capsys, argv, needle):
    assert main([a.replace("{run}", str(trained)) for a in argv]) == 2
    _one_error_line(capsys, needle)


@pytest.mark.parametrize(
    "exc, code, needle",
    [
        (FloatingPointError("loss became nan at step 3"), 1, "loss became nan"),
        (OSError(28, "No space left on device"), 1, "No space left"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (ValueError("a\nb"), 2, "error: a b"),
    ],
)
def test_exit_codes_of_failures(tmp_path, corpus, capsys, monkeypatch, exc, code, needle):
    import xmoe.train.loop as loop

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(loop, "train", fail)
    args = ["train", "--run-dir", str(tmp_path / "r"), "--data", corpus, "--no-progress"]
    assert main(args + sets("train.steps=1")) == code
    _one_error_line(capsys, needle)
