"""The config loader: defaults ← YAML ← override layers, typed sub-configs, errors by full key."""

from __future__ import annotations

import pytest
import yaml

from xmoe.models import MoEConfig as ModelsMoEConfig
from xmoe.moe.config import EvoConfig, LocalSearchConfig, MoEConfig
from xmoe.train.config import RunConfig, load_config, parse_overrides, with_overrides


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_without_a_file_are_the_dataclass_defaults():
    assert load_config() == RunConfig()
    assert ModelsMoEConfig is MoEConfig  # re-exported beside the GPT


def test_yaml_merges_section_by_section_and_replaces_router_options_whole(tmp_path):
    path = _yaml(
        tmp_path,
        {
            "model": {"n_layer": 2, "moe": {"router_options": {"threshold": 0.8}}},
            "train": {"steps": 7},
        },
    )
    cfg = load_config(path)
    assert cfg.model.n_layer == 2 and cfg.model.d_model == RunConfig().model.d_model
    assert cfg.train.steps == 7 and cfg.train.lr == RunConfig().train.lr
    assert cfg.model.moe.router_options == {"threshold": 0.8}
    # --set strings on top; a later layer wins; a dotted key reaches into router_options
    cfg = load_config(
        path,
        ["model.moe.router_options.renormalize=true", "train.steps=9"],
        {"train.steps": 11},
    )
    assert cfg.model.moe.router_options == {"threshold": 0.8, "renormalize": True}
    assert cfg.train.steps == 11
    # a whole mapping replaces router_options
    cfg = load_config(path, {"model.moe.router_options": {"k": 2}, "model.moe.router": "topk"})
    assert cfg.model.moe.router_options == {"k": 2}


def test_string_and_typed_layers_give_the_same_config():
    strings = load_config(None, ["model.moe.router=topk", "model.moe.router_options={k: 2}"])
    typed = load_config(None, {"model.moe.router": "topk", "model.moe.router_options": {"k": 2}})
    assert strings == typed


def test_ints_are_accepted_for_floats():
    cfg = load_config(None, {"train.lr": 1, "train.time_limit_s": 5})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "key",
    [
        "bogus",
        "train.bogus",
        "model.bogus",
        "model.moe.bogus",
        "model.moe.local_search.bogus",
        "model.moe.evo.bogus",
    ],
)
def test_unknown_keys_name_the_full_key_from_yaml_strings_and_typed_layers(tmp_path, key):
    match = f"unknown config key '{key}'"
    extra = {"model.moe.evo.diversify_step": 1} if ".evo." in key else {}
    with pytest.raises(ValueError, match=match):
        load_config(None, extra, [f"{key}=1"])
    with pytest.raises(ValueError, match=match):
        with_overrides(RunConfig(), extra, {key: 1})
    nested: dict = {}
    node = nested
    *sections, leaf = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = 1
    if extra:
        nested["model"]["moe"]["evo"]["diversify_step"] = 1
    with pytest.raises(ValueError, match=match):
        load_config(_yaml(tmp_path, nested))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.steps": "abc"}, "'train.steps' must be int"),
        ({"train.steps": 2.5}, "'train.steps' must be int"),
        ({"train.steps": True}, "'train.steps' must be int"),
        ({"train.lr": "fast"}, "'train.lr' must be float"),
        ({"model.moe.bias": 1}, "'model.moe.bias' must be bool"),
        ({"model.moe.router": 3}, "'model.moe.router' must be str"),
        ({"model.moe.router_options": 3}, "'model.moe.router_options' must be a mapping"),
        ({"train": 3}, "config section 'train.' must be a mapping"),
        ({"model.moe.local_search": 0.1}, "'model.moe.local_search.' must be a mapping"),
        ({"train.steps.x": 1}, "'steps' is not a config section"),
        ({"train.steps": 0}, "train.steps must be an integer >= 1"),
        ({"train.lr": 0}, "train.lr must be a finite number > 0"),
        ({"model.n_head": 3}, "divisible by model.n_head"),
    ],
)
def test_wrong_types_and_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, override)


def test_parse_overrides_reads_yaml_values_and_rejects_items_without_equals():
    assert parse_overrides(["a=1", "b=x", "c={k: 2}", "d=", "e=true"]) == {
        "a": 1,
        "b": "x",
        "c": {"k": 2},
        "d": None,
        "e": True,
    }
    # a repeated key counts as the later one (after the keys set in between)
    assert list(parse_overrides(["a=1", "b=2", "a=3"]).items()) == [("b", 2), ("a", 3)]
    with pytest.raises(ValueError, match="--set expects key=value"):
        parse_overrides(["train.steps"])


def test_with_overrides_returns_a_new_validated_config_and_copies_values():
    base = RunConfig()
    options = {"k": 2}
    cfg = with_overrides(
        base, {"model.moe.router": "topk", "model.moe.router_options": options}, {"train.steps": 5}
    )
    assert (cfg.model.moe.router, cfg.model.moe.router_options, cfg.train.steps) == (
        "topk",
        {"k": 2},
        5,
    )
    assert base == RunConfig()  # untouched
    options["k"] = 3
    assert cfg.model.moe.router_options == {"k": 2}  # no aliasing of the caller's dict
    with pytest.raises(ValueError, match="train.steps must be an integer >= 1"):
        with_overrides(base, {"train.steps": 0})


def test_local_search_and_evo_are_typed_sub_configs_where_empty_means_off(tmp_path):
    old = _yaml(tmp_path, {"model": {"moe": {"local_search": {}, "evo": {}}}})
    cfg = load_config(old)
    assert cfg.model.moe.local_search is None and cfg.model.moe.evo is None
    assert load_config(None, ["model.moe.local_search={}", "model.moe.evo=null"]) == cfg

    cfg = load_config(
        None,
        ["model.moe.local_search={search_fraction: 0.2}", "model.moe.evo.diversify_step=3"],
    )
    assert cfg.model.moe.local_search == LocalSearchConfig(search_fraction=0.2)
    assert cfg.model.moe.evo == EvoConfig(diversify_step=3)
    # a dataclass value is taken as its mapping
    cfg = with_overrides(cfg, {"model.moe.evo": EvoConfig(diversify_step=4, mask_ratio=0.25)})
    assert cfg.model.moe.evo == EvoConfig(4, 0.25)
    assert with_overrides(cfg, {"model.moe.evo": None}).model.moe.evo is None


def test_evo_needs_a_diversify_step_inside_the_run():
    with pytest.raises(ValueError, match="'model.moe.evo.diversify_step' is required"):
        load_config(None, {"model.moe.evo": {"mask_ratio": 0.5}})
    with pytest.raises(ValueError, match=r"diversify_step must be an integer \[1, 9\], got 10"):
        load_config(None, {"model.moe.evo.diversify_step": 10, "train.steps": 10})
    with pytest.raises(ValueError, match="does not support parallel.expert_parallel=2"):
        load_config(None, {"model.moe.evo.diversify_step": 1, "parallel.expert_parallel": 2})


def test_a_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(
        None,
        {
            "model.moe.local_search": {"search_fraction": 0.3},
            "model.moe.evo.diversify_step": 2,
            "model.moe.capacity_factor": "dropless",
        },
    )
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left
    plain = tmp_path / "plain.yaml"
    RunConfig().save(plain)
    assert load_config(plain) == RunConfig()


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_task_defaults_to_lm_and_unknown_task_is_refused():
    from xmoe.train.config import load_config

    assert load_config().task == "lm"
    with pytest.raises(ValueError, match="task must be one of"):
        load_config(None, {"task": "bogus"})


def test_lm_task_takes_no_task_options():
    from xmoe.train.config import load_config

    with pytest.raises(ValueError, match="takes no task_options"):
        load_config(None, {"task_options.foo": 1})


def test_make_task_builds_the_lm_task():
    from xmoe.train.config import load_config
    from xmoe.train.lm_task import LMTask
    from xmoe.train.tasks import make_task

    assert isinstance(make_task(load_config()), LMTask)
