"""The router zoo inside the GPT and the ``xmoe compare`` / ``xmoe routers`` commands."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from xmoe.cli import main
from xmoe.models import GPT, GPTConfig, MoEConfig
from xmoe.routing import ROUTERS, HashRouter
from xmoe.train.lm_task import fit_token_statistics

VOCAB = 64


def tiny_config(router="threshold", router_options=None, **moe_overrides) -> GPTConfig:
    moe = MoEConfig(
        num_experts=4,
        d_expert=8,
        router=router,
        router_options=dict(router_options or {}),
        **moe_overrides,
    )
    return GPTConfig(
        vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, moe=moe
    )


# --------------------------------------------------------------------------------------------
# The GPT with the new routers
# --------------------------------------------------------------------------------------------


def test_gpt_passes_token_ids_so_a_hash_routed_gpt_routes_by_id_and_trains():
    torch.manual_seed(0)
    model = GPT(tiny_config("hash"))
    routers = [m.router for m in model.moe_layers]
    assert all(isinstance(r, HashRouter) and r.vocab_size == VOCAB for r in routers)
    idx = torch.randint(0, VOCAB, (4, 16))
    out = model(idx, idx)
    for routing, router in zip(out.routings, routers, strict=True):
        assert torch.equal(routing.expert_idx, router.table[idx.reshape(-1)])
        assert routing.experts_per_token == 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        out = model(idx, idx)
        assert torch.isfinite(out.loss)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(model(idx, idx).loss.detach()) < first - 0.1
    assert model.moe_layers[0].experts.w1.grad is not None


def _zipf_stream(n_tokens=20_000, seed=0):
    g = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1)
    p = p[g.permutation(VOCAB)]
    return g.choice(VOCAB, size=n_tokens, p=p / p.sum()).astype(np.int32)


def _load_ratio(table, counts):
    loads = torch.zeros(4, dtype=torch.float64).index_add(0, table, counts.double())
    return float(loads.max() / loads.min())


def test_fit_token_statistics_fits_frequency_balanced_hash_tables():
    model = GPT(tiny_config("hash", {"balance": "frequency"}))
    before = [m.router.table.clone() for m in model.moe_layers]
    stream = _zipf_stream()
    fit_token_statistics(model, SimpleNamespace(train=stream))
    counts = torch.bincount(torch.from_numpy(stream.astype(np.int64)), minlength=VOCAB)
    for m, old in zip(model.moe_layers, before, strict=True):
        assert not torch.equal(m.router.table, old)
        assert _load_ratio(m.router.table, counts) < 1.05
        assert _load_ratio(m.router.table, counts) < _load_ratio(old, counts)
    # the random-balance hash keeps its table
    random_model = GPT(tiny_config("hash"))
    tables = [m.router.table.clone() for m in random_model.moe_layers]
    fit_token_statistics(random_model, SimpleNamespace(train=stream))
    assert all(torch.equal(m.router.table, t) for m, t in zip(random_model.moe_layers, tables))


def test_loss_coefs_merge_router_defaults_with_config_overrides():
    assert GPT(tiny_config("noisy_topk", {"k": 2})).loss_coefs() == {
        "importance": 0.1,
        "load": 0.1,
    }
    cfg = tiny_config("noisy_topk", {"k": 2}, loss_coefs={"load": 0.5, "z_loss": 0.01})
    model = GPT(cfg)
    coefs = model.loss_coefs()
    assert coefs == {"importance": 0.1, "load": 0.5, "z_loss": 0.01}
    assert GPT(tiny_config("switch")).loss_coefs() == {"load_balance": 0.01, "z_loss": 0.001}
    assert GPT(tiny_config("hash")).loss_coefs() == {}
    # the model loss uses the merged coefficients
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, 16))
    out = model.train()(idx, idx)
    expected = out.lm_loss + sum(
        sum(coefs[k] * r.losses[k] for k in ("importance", "load", "z_loss")) / 2
        for r in out.routings
    )
    torch.testing.assert_close(out.loss, expected)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


TINY_YAML = {
    "model": {
        "vocab_size": 300,
        "block_size": 16,
        "n_layer": 2,
        "n_head": 2,
        "d_model": 16,
        "d_ff": 32,
        "moe": {"num_experts": 4, "d_expert": 8},
    },
    "data": {"vocab_size": 300},
    "train": {
        "batch_size": 4,
        "eval_batch_size": 8,
        "eval_tokens": 256,
        "warmup_steps": 1,
        "log_every": 1,
        "time_limit_s": 1,  # compare must lift it (equal budgets)
    },
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_YAML))
    return str(path)


def test_compare_cli_trains_each_router_and_writes_results(tmp_path, corpus, tiny_yaml, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", tiny_yaml, "--set", f"data.path={corpus}"]
    args += ["--set", "train.eval_every=100", "--steps", "2", "--no-progress"]
    args += ["--routers", "switch,threshold+null,hash", "--out", str(out)]
    assert main(args) == 0
    assert "results.md" in capsys.readouterr().out

    data = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["switch", "threshold+null", "hash"]
    for name, row in rows.items():
        for key in (
            "val_ppl",
            "experts_per_token",
            "moe_compute_ratio",
            "load_imbalance",
            "dropped_fraction",
        ):
            assert row[key] is not None, (name, key)
        assert row["val_ppl"] > 1
        assert row["dropped_fraction"] == 0.0  # eval is dropless
        summary = json.loads((out / name.replace("+", "_") / "summary.json").read_text())
        assert summary["steps"] == 2  # the YAML's 1 s time limit was lifted
        assert summary["router"] == row["router"]
    assert rows["switch"]["router"] == "switch"
    assert rows["switch"]["experts_per_token"] == pytest.approx(1.0)
    assert rows["hash"]["experts_per_token"] == pytest.approx(1.0)
    assert rows["hash"]["moe_compute_ratio"] == pytest.approx(8 / 32)
    assert rows["threshold+null"]["router_options"] == {"threshold": 0.9, "num_null_experts": 4}
    assert rows["threshold+null"]["null_fraction"] is not None
    assert 0.0 <= rows["threshold+null"]["null_fraction"] <= 1.0
    assert rows["switch"]["null_fraction"] is None

    md = (out / "results.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| variant |"))
    assert "val ppl" in md[header] and "experts/token" in md[header]
    assert md[header + 1].startswith("|---")
    body = md[header + 2 :]
    assert [line.split("|")[1].strip() for line in body] == list(rows)


def test_compare_rejects_an_unknown_router_before_any_training(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "cmp"
    code = main(
        ["compare", "--config", tiny_yaml, "--routers", "switch,nope", "--out", str(out)]
        + ["--steps", "1", "--no-progress"]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()


def test_compare_requires_routers_and_positive_steps(tmp_path, tiny_yaml, capsys):
    assert main(["compare", "--config", tiny_yaml, "--out", str(tmp_path / "a")]) == 2
    assert "--routers" in capsys.readouterr().err
    code = main(["compare", "--config", tiny_yaml, "--routers", "switch", "--steps", "0"])
    assert code == 2
    assert "--steps" in capsys.readouterr().err


def test_routers_command_lists_all_registered_routers_including_the_eight_zoo_routers(capsys):
    assert main(["routers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    expected = {
        "threshold",
        "topk",
        "switch",
        "gshard",
        "noisy_topk",
        "expert_choice",
        "hash",
        "base",
    }
    assert expected <= set(names)  # the eight zoo routers
    assert set(names) == set(ROUTERS) and len(names) == len(ROUTERS)
    assert all(len(line.split()) > 1 for line in lines)  # each has a description
