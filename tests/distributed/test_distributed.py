"""Expert parallelism + data parallelism on torch.distributed, with 2 gloo processes on CPU.

Two spawns for the whole file (a spawn costs a few seconds of imports): one runs every layer
check, one every training / checkpoint check. The workers write their measurements to JSON and
the tests below assert on them, so each behaviour is its own test.

Each layer check builds the single-process MoE from one seed on both ranks, runs it on the
full input (the reference), then shards it 2 ways and feeds each rank its half of the input.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_MODEL
from xmoe import MoE
from xmoe.distributed import (
    ExpertParallelMoE,
    check_expert_parallel,
    make_context,
    use_global_router_stats,
)
from xmoe.distributed.groups import free_local_port, init_local_gloo
from xmoe.train import train
from xmoe.train.config import load_config

pytestmark = pytest.mark.dist

WORLD = 2
D, H, E = 16, 8, 4
TOL = 1e-5  # fp32: only summation order differs from the single-process layer


def _spawn(fn, *args, nprocs: int = WORLD, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, port, *args)`` in ``nprocs`` processes. Forked (where available) from this
    process, whose torch / xmoe imports they inherit: a fresh interpreter pays ~5 s of imports
    per process. The workers use one intra-op thread and no process group exists here. A hang
    (e.g. ranks disagreeing on a collective) fails the test after ``timeout_s``."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        fn, args=(free_local_port(), *args), nprocs=nprocs, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__}: workers still running after {timeout_s:.0f} s (hang)")


def _init(rank: int, port: int, world: int = WORLD) -> None:
    init_local_gloo(rank, world, port, timeout_s=120)


# --------------------------------------------------------------------------------------------
# Layer: 2-rank EP output and gradients == single-process layer
# --------------------------------------------------------------------------------------------

LAYER_CASES = {
    # name: (router options, tokens on rank 0, tokens on rank 1, routing on local tokens only)
    "topk": ({"router": "topk", "k": 2}, 10, 10, False),
    "threshold": ({"router": "threshold", "threshold": 0.8}, 10, 10, False),
    # Expert Choice ranks tokens within a batch, so its reference is per rank's tokens.
    "expert_choice": ({"router": "expert_choice", "expert_capacity": 0.5}, 10, 10, True),
    # every token picks experts 0 and 1: rank 1 (experts 2, 3) receives no rows at all
    "rank_receives_nothing": ({"router": "topk", "k": 2}, 10, 10, False),
    # rank 1 has no tokens of its own (it still serves rank 0's rows)
    "rank_sends_nothing": ({"router": "threshold", "threshold": 0.8}, 12, 0, False),
}


def _layer_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    results = {}
    for name, (opts, n0, n1, local_ref) in LAYER_CASES.items():
        results[name] = _layer_case(rank, name, dict(opts), n0, n1, local_ref)
    try:
        ExpertParallelMoE.from_moe(MoE(D, 3, H, router="topk", k=1))
        results["indivisible_error"] = ""
    except ValueError as exc:
        results["indivisible_error"] = str(exc)
    from xmoe.bench.comm import measure_in_group

    results["comm"] = measure_in_group(
        rank, WORLD, 64, D, E, H, ["top2", "t0.9@1.5"], reps=1, warmup=0, seed=0
    )
    Path(out_dir, f"layer{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _layer_case(rank, name, opts, n0, n1, local_ref) -> dict:
    torch.manual_seed(0)
    router = opts.pop("router")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert_choice's causal-leak warning
        moe = MoE(D, E, H, router=router, backend="loop", init_std=0.5, **opts)
    x = torch.randn(n0 + n1, D)
    if name == "rank_receives_nothing":
        x[:, 0] = x[:, 0].abs() + 5.0
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[:, 0] = torch.tensor([1.0, 0.5, -1.0, -1.0])
    g = torch.randn(n0 + n1, D, generator=torch.Generator().manual_seed(1))
    has_lb = router != "expert_choice"
    bounds = [(0, n0), (n0, n0 + n1)]
    chunks = bounds if local_ref else [(0, n0 + n1)]

    # Reference: the single-process layer (on every chunk), objective (y*g).sum() + load_balance
    x_ref = x.clone().requires_grad_()
    ys, lb_ref = [], None
    for lo, hi in chunks:
        y, routing = moe.forward_with_routing(x_ref[lo:hi])
        ys.append(y)
        if has_lb:
            lb_ref = routing.losses["load_balance"]
    y_ref = torch.cat(ys)
    objective = (y_ref * g).sum() + (lb_ref if has_lb else 0.0)
    params = dict(moe.named_parameters())
    *grads, x_grad_ref = torch.autograd.grad(objective, [*params.values(), x_ref])
    grads_ref = dict(zip(params, grads, strict=True))

    # Expert parallel: this rank's tokens, this rank's experts, global load balance.
    ep = ExpertParallelMoE.from_moe(moe)
    use_global_router_stats(ep.router)
    lo, hi = bounds[rank]
    x_local = x[lo:hi].clone().requires_grad_()
    y, routing = ep.forward_with_routing(x_local)
    local_obj = (y * g[lo:hi]).sum()
    if has_lb:  # every rank holds the global value; its gradient is all-reduced in backward
        local_obj = local_obj + routing.losses["load_balance"] / WORLD
    local_obj.backward()
    out = {
        "y": (y - y_ref[lo:hi]).abs().max().item() if hi > lo else 0.0,
        "x_grad": (x_local.grad - x_grad_ref[lo:hi]).abs().max().item() if hi > lo else 0.0,
        "rows_received": _rows_received(ep, routing),
        "experts_per_token": torch.bincount(routing.token_idx, minlength=hi - lo).tolist(),
    }
    if has_lb:
        out["load_balance"] = abs(routing.losses["load_balance"].item() - lb_ref.item())
    for pname, p in ep.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        if pname.startswith("router."):  # replicated: the sum over ranks is the full gradient
            dist.all_reduce(grad)
            want = grads_ref[pname]
        else:  # expert slice
            start = ep.expert_offset
            want = grads_ref[pname][start : start + ep.num_local_experts]
        out[f"grad.{pname}"] = (grad - want).abs().max().item()
        out[f"gradnorm.{pname}"] = want.abs().max().item()
    return out


def _rows_received(ep: ExpertParallelMoE, routing) -> int:
    """Rows this rank's experts computed, from the global routing counts."""
    counts = routing.expert_counts.clone()
    dist.all_reduce(counts)
    start = ep.expert_offset
    return int(counts[start : start + ep.num_local_experts].sum())


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("layer")
    _spawn(_layer_worker, str(out))
    return [json.loads((out / f"layer{r}.json").read_text()) for r in range(WORLD)]


def _assert_case_matches(results, case: str) -> None:
    for rank, res in enumerate(results):
        r = res[case]
        for key, value in r.items():
            if key in ("y", "x_grad", "load_balance") or key.startswith("grad."):
                assert value <= TOL, f"{case} rank {rank}: {key} differs by {value}"


@pytest.mark.parametrize("case", ["topk", "threshold", "expert_choice"])
def test_ep_layer_matches_single_process_outputs_and_gradients(layer_results, case):
    _assert_case_matches(layer_results, case)
    # the gradients compared are not trivially zero
    assert layer_results[0][case]["gradnorm.experts.w1"] > 1e-3
    assert layer_results[1][case]["gradnorm.router.weight"] > 1e-3


def test_threshold_and_expert_choice_cases_have_variable_experts_per_token(layer_results):
    for case in ("threshold", "expert_choice"):
        counts = layer_results[0][case]["experts_per_token"]
        assert min(counts) < max(counts), (case, counts)
    # quota ceil(0.5 * 10 / 4) = 2 tokens per expert: 8 pairs for 10 tokens, some get none
    assert 0 in layer_results[0]["expert_choice"]["experts_per_token"]


def test_ep_layer_with_a_rank_that_receives_no_rows(layer_results):
    assert layer_results[1]["rank_receives_nothing"]["rows_received"] == 0
    assert layer_results[0]["rank_receives_nothing"]["rows_received"] == 40
    _assert_case_matches(layer_results, "rank_receives_nothing")


def test_ep_layer_with_a_rank_that_has_no_tokens(layer_results):
    assert layer_results[1]["rank_sends_nothing"]["rows_received"] > 0
    _assert_case_matches(layer_results, "rank_sends_nothing")


def test_ep_layer_rejects_experts_not_divisible_by_ranks(layer_results):
    assert "not divisible" in layer_results[0]["indivisible_error"]


def test_comm_bench_counts_fewer_bytes_for_fewer_experts_per_token(layer_results):
    top2, threshold = layer_results[0]["comm"]
    assert top2["experts_per_token"] == 2.0
    assert abs(threshold["experts_per_token"] - 1.5) < 0.1
    for row in (top2, threshold):  # fwd + bwd, fp32 rows of D
        assert row["bytes_sent_per_step"] == 2 * row["rows_sent_fwd"] * D * 4
        assert row["a2a_fwd_ms"] > 0 and row["layer_fwd_bwd_ms"] > 0
    assert 0 < threshold["bytes_sent_per_step"] < top2["bytes_sent_per_step"]


# --------------------------------------------------------------------------------------------
# Configuration errors (no processes needed)
# --------------------------------------------------------------------------------------------

TINY = [
    *TINY_MODEL,
    "model.moe.router=topk",
    "model.moe.router_options={k: 2}",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.eval_tokens=128",
    "train.eval_every=1000",
    "train.warmup_steps=2",
    "train.min_lr_ratio=1.0",  # constant lr after warmup: a resumed run equals a straight one
    "train.log_every=1",
    "train.checkpoint_every=0",
]


def test_experts_not_divisible_by_expert_parallel_is_a_config_error():
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by parallel.expert_par"):
        load_config(None, [*TINY, "parallel.expert_parallel=3"])


def test_expert_parallel_larger_than_world_size_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="larger than the world size 1"):
        check_expert_parallel(2, 1, 4)
    cfg = load_config(None, [*TINY, "parallel.expert_parallel=2"])
    with pytest.raises(ValueError, match="expert_parallel=2 is larger than the world size 1"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # failed before touching the run dir


def test_bad_expert_parallel_values_are_config_errors():
    with pytest.raises(ValueError, match="integer >= 1"):
        load_config(None, [*TINY, "parallel.expert_parallel=0"])
    with pytest.raises(ValueError, match="must divide the world size"):
        check_expert_parallel(2, 3, 4)


# --------------------------------------------------------------------------------------------
# Building the EP layer and the router statistics hook (no processes needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cf,want", [("dropless", None), (None, 1.25), (2.0, 2.0)])
def test_expert_parallel_layer_is_an_moe_holding_its_expert_slice(cf, want):
    torch.manual_seed(0)
    moe = MoE(D, E, H, router="switch", capacity_factor=cf, eval_capacity_factor=3.0)
    state = torch.random.get_rng_state()
    ep = ExpertParallelMoE(moe, None, 2, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # building draws no random numbers
    assert ep.router is moe.router
    assert [n for n, _ in ep.named_parameters()] == [n for n, _ in moe.named_parameters()]
    assert (ep.num_experts, ep.experts.num_experts, ep.expert_offset) == (E, 2, 2)
    for name, p in ep.experts.named_parameters():
        assert torch.equal(p, getattr(moe.experts, name)[2:4]), name
    assert (ep.capacity_factor, ep.eval_capacity_factor) == (want, 3.0)
    assert ep.experts.backend == moe.experts.backend


def test_use_global_router_stats_sets_the_hook_and_replaces_no_method():
    moe = MoE(D, E, H, router="topk", k=2, loss_free_balance=True)
    assert moe.router.reduce_stats is None
    assert use_global_router_stats(moe) == 1
    assert callable(moe.router.reduce_stats)
    assert "standard_losses" not in vars(moe.router) and "_update_bias" not in vars(moe.router)
    moe.eval()(torch.randn(5, D))  # eval statistics stay local: no process group needed


# --------------------------------------------------------------------------------------------
# Training: loss curves and checkpoints across world sizes
# --------------------------------------------------------------------------------------------

STEPS, HALF = 6, 3


def _sets(root: Path, steps: int) -> list[str]:
    return [*TINY, f"data.path={root / 'corpus.txt'}", f"train.steps={steps}"]


def _losses(run: Path, key: str = "loss") -> list[float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if r["split"] == "train"]


def _train_worker(rank: int, port: int, root: str) -> None:
    _init(rank, port)
    root = Path(root)
    ctx = make_context(2)

    def cfg(steps: int, p: int):
        return load_config(None, [*_sets(root, steps), f"parallel.expert_parallel={p}"])

    # EP=2, 6 steps: compared with the single-process 6-step run.
    train(cfg(STEPS, 2), root / "ep2", progress=False, parallel=ctx)
    # EP=2, 3 steps: the parent resumes it with one process (P=2 -> P=1).
    train(cfg(HALF, 2), root / "ep2_half", progress=False, parallel=ctx)
    # Resume the single-process 3-step run with EP=2 (P=1 -> P=2).
    train(cfg(STEPS, 2), root / "single_half", resume=True, progress=False, parallel=ctx)
    # Pure data parallelism (2 ranks, every rank holds all experts), 3 steps.
    dp = make_context(1)
    train(cfg(HALF, 1), root / "dp2", progress=False, parallel=dp)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    try:
        return _make_runs(tmp_path_factory.mktemp("runs"), corpus)
    finally:
        torch.set_num_threads(threads)


def _make_runs(root: Path, corpus: str) -> Path:
    """Single-process runs here, 2-rank runs in the workers, then a 1-process resume."""
    shutil.copy(corpus, root / "corpus.txt")
    train(load_config(None, _sets(root, STEPS)), root / "single", progress=False)
    # Every run fits its own tokenizer on the same corpus (deterministic, so the same tokens).
    train(load_config(None, _sets(root, HALF)), root / "single_half", progress=False)
    _spawn(_train_worker, str(root))
    resumed = load_config(root / "ep2_half" / "config.yaml", ["parallel.expert_parallel=1"])
    resumed.train.steps = STEPS
    train(resumed, root / "ep2_half", resume=True, progress=False)
    return root


# Loss tolerance. Both runs see the same global batch and identical initial weights; they differ
# only in fp32 summation order (batch split in 2, gradient all-reduce, norms of sharded experts),
# ~1e-7 relative per step, which AdamW (update ~ lr * sign-like for small moments) can amplify
# to ~1e-5 in the loss over a few steps. A real layout bug (a gradient not averaged, a
# local instead of global load-balance loss, a wrong data shard) moves the loss by > 1e-3.
LOSS_TOL = 1e-4


def test_two_rank_expert_parallel_training_matches_single_process_loss_curve(runs):
    single, ep = _losses(runs / "single"), _losses(runs / "ep2")
    assert len(single) == len(ep) == STEPS
    assert max(abs(a - b) for a, b in zip(single, ep, strict=True)) < LOSS_TOL, (single, ep)
    assert single[-1] < single[0]  # it trains
    # AdamW is nearly blind to a gradient's scale, so the loss alone would miss e.g. an expert
    # gradient not averaged over ranks; the (pre-clip) global gradient norm does not.
    norms, ep_norms = _losses(runs / "single", "grad_norm"), _losses(runs / "ep2", "grad_norm")
    torch.testing.assert_close(ep_norms, norms, rtol=1e-4, atol=0)
    s = json.loads((runs / "ep2" / "summary.json").read_text())
    t = json.loads((runs / "single" / "summary.json").read_text())
    assert s["parallel"] == {"world_size": 2, "expert_parallel": 2, "data_parallel": 1}
    assert s["params"] == t["params"]  # the whole model, not rank 0's shard
    assert abs(s["val_loss"] - t["val_loss"]) < LOSS_TOL


def test_two_rank_data_parallel_training_matches_single_process_loss_curve(runs):
    single, dp = _losses(runs / "single")[:HALF], _losses(runs / "dp2")
    assert max(abs(a - b) for a, b in zip(single, dp, strict=True)) < LOSS_TOL, (single, dp)
    norms = _losses(runs / "single", "grad_norm")[:HALF]
    torch.testing.assert_close(_losses(runs / "dp2", "grad_norm"), norms, rtol=1e-4, atol=0)


def test_expert_parallel_checkpoint_is_the_single_process_checkpoint(runs):
    from safetensors.torch import load_file

    ep = load_file(str(runs / "ep2" / "checkpoint" / "model.safetensors"))
    single = load_file(str(runs / "single" / "checkpoint" / "model.safetensors"))
    assert ep.keys() == single.keys()
    for k in single:
        assert ep[k].shape == single[k].shape, k
        torch.testing.assert_close(ep[k], single[k], atol=1e-5, rtol=0, msg=k)
    opt_ep = load_file(str(runs / "ep2" / "checkpoint" / "optimizer.safetensors"))
    opt_single = load_file(str(runs / "single" / "checkpoint" / "optimizer.safetensors"))
    assert {k: v.shape for k, v in opt_ep.items()} == {k: v.shape for k, v in opt_single.items()}


def test_checkpoint_saved_with_two_ranks_resumes_with_one(runs):
    single, resumed = _losses(runs / "single"), _losses(runs / "ep2_half")
    assert len(resumed) == STEPS
    assert max(abs(a - b) for a, b in zip(single, resumed, strict=True)) < LOSS_TOL


def test_checkpoint_saved_with_one_rank_resumes_with_two(runs):
    single, resumed = _losses(runs / "single"), _losses(runs / "single_half")
    assert len(resumed) == STEPS
    assert max(abs(a - b) for a, b in zip(single, resumed, strict=True)) < LOSS_TOL
    cfg = json.loads((runs / "single_half" / "summary.json").read_text())
    assert cfg["parallel"]["expert_parallel"] == 2


def _four_rank_worker(rank: int, port: int, root: str) -> None:
    """W = 4, P = 2: two EP groups {0, 1}, {2, 3}; expert slices replicated over {0, 2}, {1, 3}."""
    _init(rank, port, world=4)
    ctx = make_context(2)
    assert ctx.data_parallel == 2 and ctx.expert_dp_group is not None
    cfg = load_config(None, [*_sets(Path(root), HALF), "parallel.expert_parallel=2"])
    train(cfg, Path(root) / "ep2_dp2", progress=False, parallel=ctx)
    dist.destroy_process_group()


def test_four_ranks_expert_parallel_2_with_replicated_experts_match_single_process(runs):
    _spawn(_four_rank_worker, str(runs), nprocs=4)
    single, four = _losses(runs / "single")[:HALF], _losses(runs / "ep2_dp2")
    assert max(abs(a - b) for a, b in zip(single, four, strict=True)) < LOSS_TOL, (single, four)
    norms = _losses(runs / "single", "grad_norm")[:HALF]
    torch.testing.assert_close(_losses(runs / "ep2_dp2", "grad_norm"), norms, rtol=1e-4, atol=0)
    summary = json.loads((runs / "ep2_dp2" / "summary.json").read_text())
    assert summary["parallel"] == {"world_size": 4, "expert_parallel": 2, "data_parallel": 2}


def _cli_worker(rank: int, port: int, root: str, out: str, port2: int) -> None:
    """What torchrun gives each process: the env:// variables, then ``python -m xmoe``.

    The second launch uses another port: re-initialising on the same one could let a fast rank
    reach the previous launch's store before the slow rank has torn it down."""
    from xmoe.cli import main

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    run = str(Path(root) / "cli_ep2")
    sets = [a for item in _sets(Path(root), 2) for a in ("--set", item)]
    args = ["train", "--run-dir", run, "--no-progress", "--overwrite", *sets]
    first = main([*args, "--set", "parallel.expert_parallel=2"])
    initialised_after = dist.is_initialized()
    # rank 0 finds the run dir not empty: every rank must fail with the message, none hang
    os.environ["MASTER_PORT"] = str(port2)
    second = main([a for a in args if a != "--overwrite"])
    Path(out, f"cli{rank}.json").write_text(json.dumps([first, initialised_after, second]))


def test_torchrun_style_launch_through_the_cli(runs, tmp_path, capfd):
    _spawn(_cli_worker, str(runs), str(tmp_path), free_local_port())
    for rank in range(WORLD):
        first, initialised_after, second = json.loads((tmp_path / f"cli{rank}.json").read_text())
        assert first == 0 and not initialised_after  # the trainer destroys the group it made
        assert second == 2
    assert capfd.readouterr().err.count("is not empty; pass --resume") == WORLD
    summary = json.loads((runs / "cli_ep2" / "summary.json").read_text())
    assert summary["parallel"]["expert_parallel"] == 2 and summary["steps"] == 2


def test_single_process_training_needs_no_process_group(runs):
    assert os.environ.get("WORLD_SIZE", "1") == "1"
    assert not dist.is_initialized()  # the parent trained 3 runs without one
    assert "parallel" not in json.loads((runs / "single" / "summary.json").read_text())
