"""Issue 17 item 1 at the config level: every user mistake is a ValueError naming the file or
the full key and the accepted range; every float spelling a user writes is a float."""

from __future__ import annotations

import math

import pytest

from xmoe.train.config import load_config, parse_overrides


@pytest.mark.parametrize(
    "spelling, value",
    [
        ("3e-4", 3e-4),
        ("1E-3", 1e-3),
        (".5e-3", 0.5e-3),
        ("+2e-2", 2e-2),
        ("3.0e-4", 3e-4),
        ("0.003", 0.003),
        ("1e0", 1.0),
    ],
)
def test_every_float_spelling_is_a_float_in_set_and_in_files(tmp_path, spelling, value):
    assert load_config(None, [f"train.lr={spelling}"]).train.lr == pytest.approx(value)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {spelling}\n")
    assert load_config(path).train.lr == pytest.approx(value)


def test_a_float_spelling_for_an_int_key_is_refused_by_name():
    with pytest.raises(ValueError, match="'train.steps' must be int, got 1000.0"):
        load_config(None, ["train.steps=1e3"])
    assert parse_overrides(["x=1e3", "y=abc", "z=12"]) == {"x": 1000.0, "y": "abc", "z": 12}


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  lr: [1,\nmodel: {\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*line \d+, column \d+ invalid YAML"):
        load_config(path)
    with pytest.raises(ValueError, match=r"--set train\.lr: line 1.*invalid YAML"):
        load_config(None, ["train.lr=[1,"])


def test_config_paths_that_are_not_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot be read as UTF-8"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        (["model.moe_every=0", "model.activation=foo"], "model.activation must be one of"),
        (["model.moe.loss_coefs.z_loss=abc"], r"model\.moe\.loss_coefs\.z_loss must be a number"),
        (
            ["model.moe.loss_coefs={z_loss: [1]}"],
            r"model\.moe\.loss_coefs\.z_loss must be a number",
        ),
        (
            ["model.moe.loss_coefs.z_loss=-1"],
            r"model\.moe\.loss_coefs\.z_loss must be a number in \[0",
        ),
        (["model.moe.loss_coefs.bogus=1"], r"'model\.moe\.loss_coefs\.bogus': not a router loss"),
        (["train.time_limit_s=-1"], r"train\.time_limit_s must be a number in \[0"),
        (["train.weight_decay=-0.1"], r"train\.weight_decay must be a number in \[0"),
        (["train.grad_clip=.nan"], r"train\.grad_clip must be a number in \[0.*nan"),
        (["train.grad_clip=-1"], r"train\.grad_clip must be a number in \[0"),
        (["model.moe_every=5"], r"model\.moe_every must be an integer \[0, 4\], got 5"),
        (["model.moe.num_experts=0"], r"model\.moe\.num_experts must be an integer >= 1"),
        (["model.moe.d_expert=-3"], r"model\.moe\.d_expert must be an integer >= 1"),
        (["model.moe.activation=tanh"], r"model\.moe\.activation must be one of"),
        (["model.moe.backend=cuda"], r"model\.moe\.backend must be one of"),
        (["model.moe.router=nope"], r"model\.moe\.router: router must be one of"),
        (
            ["model.moe.router_options.bogus=1"],
            r"model\.moe\.router_options \(threshold\): unknown",
        ),
        (["model.moe.router_options.threshold=2"], r"model\.moe\.router_options \(threshold\)"),
        (["model.moe.capacity_factor=-1"], r"model\.moe\.capacity_factor must be null, 'dropless'"),
        (["model.dropout=1.5"], r"model\.dropout must be .*\[0, 1\)"),
        (["train.beta2=1"], r"train\.beta2 must be a number in \[0.0, 1.0\)"),
        (["train.lr=.inf"], r"train\.lr must be a finite number > 0"),
        (["train.seed=-1"], r"train\.seed must be an integer >= 0"),
        (["train.threads=5000"], r"train\.threads must be an integer \[0, 1024\]"),
        (["model.moe.shared_experts=-1"], r"model\.moe\.shared_experts must be an integer >= 0"),
        (["model.moe.d_shared=-1"], r"model\.moe\.d_shared must be an integer >= 1"),
        (["train.tensorboard=1"], r"'train\.tensorboard' must be bool"),
        (
            ["data.vocab_size=100", "model.vocab_size=100"],
            r"data\.vocab_size must be an integer >= 257",
        ),
        (["data.val_fraction=1"], r"data\.val_fraction must be a number in \(0"),
        (["data.path=[1]"], r"'data\.path' must be str"),
        (["=3"], "--set expects key=value with a dotted key"),
        (["train..lr=3"], "--set expects key=value with a dotted key"),
    ],
)
def test_bad_values_name_the_full_key_and_the_range(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_no_time_limit_is_zero_or_null():
    assert load_config(None, ["train.time_limit_s=0"]).train.time_limit_s == 0
    assert load_config(None, ["train.time_limit_s=null"]).train.time_limit_s is None
    assert load_config(None, ["train.time_limit_s=2.5"]).train.time_limit_s == 2.5


def test_known_losses_of_other_routers_are_accepted():
    # a base config's coefficients stay valid when a comparison switches the router to hash
    cfg = load_config(None, ["model.moe.router=hash", "model.moe.loss_coefs={load_balance: 0.01}"])
    assert cfg.model.moe.loss_coefs == {"load_balance": 0.01}
    assert math.isclose(
        load_config(None, ["model.moe.loss_coefs.z_loss=1e-3"]).model.moe.loss_coefs["z_loss"], 1e-3
    )


def test_validating_the_router_leaves_the_random_stream_alone():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_config(None, ["model.moe.router=topk", "model.moe.router_options={k: 2}"])
    assert torch.equal(torch.rand(3), expected)
