"""The LM training loop: AdamW, warmup + cosine, clipping, periodic eval, atomic checkpoints.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per log/eval line),
``summary.json`` (written at the end), ``data/`` (tokenizer + token cache) and ``checkpoint/``.
Batches are a pure function of (seed, step) and the RNG state is checkpointed, so ``resume``
continues a run exactly.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..data.dataset import TokenData, prepare_data
from ..models.gpt import GPT, routing_summary
from .checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from .config import RunConfig
from .evaluate import evaluate
from .evo_recipe import EvoRecipe, build_model, carry_optimizer_state
from .schedule import lr_at

if TYPE_CHECKING:
    from ..distributed import ParallelContext


def build_optimizer(model: GPT, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms, embeddings' rows... or routers:
    decaying router weights flattens the router and raises experts/token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_router = ".router." in name
        (decay if p.dim() >= 2 and not is_router else no_decay).append(p)
    t = cfg.train
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's checkpoint (0 when there is none)."""
    ckpt = find_checkpoint(run_dir)
    return json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0


def notify_step(model: torch.nn.Module, step: int, total_steps: int) -> None:
    """Step callback: every submodule with ``set_step(step, total_steps)`` (schedules such as
    the DTS gate temperature or the local-search annealing) is told the current step."""
    for module in model.modules():
        set_step = getattr(module, "set_step", None)
        if callable(set_step):
            set_step(step, total_steps)


def fit_token_statistics(model: GPT, data: TokenData) -> None:
    """Give routers that want corpus token counts (frequency-balanced hash) the train counts."""
    routers = [m.router for m in model.moe_layers if hasattr(m.router, "fit_frequencies")]
    if routers:
        vocab = model.cfg.vocab_size
        counts = torch.bincount(torch.from_numpy(data.train.astype("int64")), minlength=vocab)
        for router in routers:
            router.fit_frequencies(counts[:vocab])


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite are mutually exclusive")
    if resume:
        if find_checkpoint(run_dir) is None:
            raise ValueError(f"--resume: no checkpoint in run dir {str(run_dir)!r}")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"run dir {str(run_dir)!r} is not empty; pass --resume to continue it or "
                "--overwrite to start over"
            )
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", "config.yaml"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def load_data(cfg: RunConfig, run_dir: Path) -> TokenData:
    d = cfg.data
    return prepare_data(run_dir / "data", d.path, d.vocab_size, d.val_fraction)


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    parallel: ParallelContext | None = None,
) -> dict:
    """Train (or resume) a run; returns the summary dict also written to ``summary.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) or with ``parallel.expert_parallel > 1`` the run is
    distributed (docs/distributed.md): the process group is initialised here unless
    ``parallel`` (a :class:`~xmoe.distributed.ParallelContext`) is given. Each rank trains on
    its shard of every global batch; rank 0 logs and writes the (consolidated) checkpoint.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    ctx, owns_group = parallel, False
    if ctx is None:
        ctx, owns_group = _init_parallel(cfg)
    try:
        return _train(cfg, run_dir, resume, overwrite, progress, ctx)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_parallel(cfg: RunConfig) -> tuple[ParallelContext | None, bool]:
    """The parallel context of a torchrun launch (None for a plain single process)."""
    import torch.distributed as dist

    from ..distributed import check_expert_parallel, init_parallel, launched_world_size

    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else launched_world_size()
    p = cfg.parallel.expert_parallel
    if world == 1 and p == 1:
        return None, False
    num_experts = cfg.model.moe.num_experts if cfg.model.moe_every else None
    check_expert_parallel(p, world, num_experts)
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
            f"{world} (every rank reads batch_size / world_size sequences of each batch)"
        )
    # gloo: the trainer keeps the model on the CPU (the EP layer itself is device-agnostic and
    # runs on NCCL with CUDA tensors when given such a group).
    return init_parallel(p, num_experts, backend="gloo"), not initialised


def _train(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    ctx: ParallelContext | None,
) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    recipe = EvoRecipe.from_config(cfg)
    # Built before touching the run dir, so bad router options fail fast.
    model = build_model(cfg, checkpoint_step(run_dir) if resume else 0)
    is_main = ctx is None or ctx.is_main
    if ctx is None:
        prepare_run_dir(run_dir, resume, overwrite)
        cfg.save(run_dir / "config.yaml")
        data = load_data(cfg, run_dir)
    else:
        from ..distributed import parallelize_model, run_on_main

        def setup() -> None:
            prepare_run_dir(run_dir, resume, overwrite)
            cfg.save(run_dir / "config.yaml")
            load_data(cfg, run_dir)  # tokenizer and token cache, once

        run_on_main(ctx, setup)
        data = load_data(cfg, run_dir)
    fit_token_statistics(model, data)
    state = {"step": 0, "tokens_seen": 0, "train_time_s": 0.0}
    if ctx is None:
        optimizer = build_optimizer(model, cfg)
        if resume:
            state = load_checkpoint(find_checkpoint(run_dir), model, optimizer)
            _truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    else:
        # The checkpoint holds the unsharded model: load it, then shard it.
        if resume:
            load_weights(find_checkpoint(run_dir), model)
        parallelize_model(model, ctx)
        optimizer = build_optimizer(model, cfg)
        if resume:
            state = load_training_state(find_checkpoint(run_dir), model, optimizer, ctx)
            if is_main:
                _truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        if not is_main:  # own dropout / noise stream per rank
            torch.manual_seed(t.seed * 1_000_003 + ctx.rank * 7919 + state["step"])
    tokens_per_step = t.batch_size * cfg.model.block_size
    # Evaluation runs where the model runs: with expert parallelism every rank takes part in
    # every forward, so all ranks evaluate the same (full) val batches.
    evaluates = ctx is None or is_main or ctx.expert_parallel > 1

    metrics_file = (run_dir / "metrics.jsonl").open("a") if is_main else None

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def checkpoint() -> None:
        save_checkpoint(run_dir, model, optimizer, state, ctx)

    start_step = state["step"]
    started = time.perf_counter()
    base_time = state["train_time_s"]
    bar = tqdm(
        total=t.steps,
        initial=start_step,
        disable=not (progress and is_main),
        desc="train",
        dynamic_ncols=True,
    )
    say = bar.write if is_main else (lambda message: None)
    model.train()
    last_eval = None
    try:
        for step in range(start_step, t.steps):
            if recipe is not None and step == recipe.diversify_step:
                recipe.diversify(model)
                if ctx is not None:
                    parallelize_model(model, ctx)
                new_optimizer = build_optimizer(model, cfg)
                carry_optimizer_state(optimizer, new_optimizer)
                optimizer = new_optimizer
                say(f"step {step}: EvoMoE diversify -> {cfg.model.moe.num_experts} experts")
            lr = lr_at(
                step,
                lr=t.lr,
                warmup_steps=t.warmup_steps,
                total_steps=t.steps,
                min_lr_ratio=t.min_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            notify_step(model, step, t.steps)
            step_start = time.perf_counter()
            x, y = data.train_batch(step, t.batch_size, cfg.model.block_size, t.seed)
            if ctx is not None:  # this rank's shard of the global batch
                rows = t.batch_size // ctx.world_size
                lo, hi = ctx.rank * rows, (ctx.rank + 1) * rows
                x, y = x[lo:hi], y[lo:hi]
            out = model(x, y)
            if ctx is None:
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"loss became {out.loss.item()} at step {step}")
            else:
                over_time = bool(t.time_limit_s) and time.perf_counter() - started > t.time_limit_s
                stats = _global_step_stats(out.loss, out.lm_loss, out.routings, over_time, ctx)
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss became {stats['loss']} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if ctx is None:
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                    if t.grad_clip > 0
                    else None
                )
            else:
                from ..distributed import clip_grad_norm_, reduce_gradients

                reduce_gradients(model, ctx)
                grad_norm = clip_grad_norm_(model, t.grad_clip, ctx) if t.grad_clip > 0 else None
            optimizer.step()
            step_time = time.perf_counter() - step_start
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            state["train_time_s"] = base_time + time.perf_counter() - started

            if ctx is None:
                stats = {
                    "experts_per_token": [r.experts_per_token for r in out.routings],
                    "dropped_fraction": [r.dropped_fraction for r in out.routings],
                }
            routing = routing_summary(
                cfg.model, model.moe_layers, stats["experts_per_token"], stats["dropped_fraction"]
            )
            ept = _mean(routing["experts_per_token"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{out.lm_loss.item() if ctx is None else stats['lm_loss']:.3f}",
                tok_s=f"{tokens_per_step / step_time:.0f}",
                ept=f"{ept:.2f}" if ept is not None else "-",
            )
            if (step + 1) % t.log_every == 0 or step == start_step:
                if ctx is None:
                    losses = {
                        "loss": out.loss.item(),
                        "lm_loss": out.lm_loss.item(),
                        "router_losses": _router_losses(out.routings),
                        **_extras(out.routings),
                    }
                else:
                    losses = {k: stats[k] for k in ("loss", "lm_loss", "router_losses")}
                    losses.update(stats["extras"])
                log(
                    {
                        "split": "train",
                        "step": step + 1,
                        "loss": losses.pop("loss"),
                        "lm_loss": losses.pop("lm_loss"),
                        "lr": lr,
                        "grad_norm": None if grad_norm is None else grad_norm.item(),
                        "tokens_per_s": tokens_per_step / step_time,
                        **losses,
                        **routing,
                    }
                )
            if (step + 1) % t.eval_every == 0 and step + 1 < t.steps and evaluates:
                last_eval = evaluate(model, data, t.eval_batch_size, t.eval_tokens)
                log({"split": "val", "step": step + 1, **last_eval})
                say(
                    f"step {step + 1}: val_loss {last_eval['val_loss']:.4f} "
                    f"val_ppl {last_eval['val_ppl']:.2f}"
                )
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                checkpoint()
            if ctx is None:
                over_time = t.time_limit_s and time.perf_counter() - started > t.time_limit_s
            else:  # all ranks stop at the same step: when any rank's clock is over
                over_time = stats["over_time"]
            if over_time:
                say(f"time limit {t.time_limit_s}s reached at step {step + 1}; stopping")
                break
    finally:
        bar.close()
    checkpoint()

    summary = None
    if evaluates:
        final = evaluate(model, data, t.eval_batch_size, None)
        log({"split": "val", "step": state["step"], "final": True, **final})
    if is_main:
        metrics_file.close()
        summary = build_summary(cfg, model, data, state, final)
        if ctx is not None:
            from ..distributed import global_num_params

            summary["params"] = global_num_params(model, ctx)
            summary["parallel"] = {
                "world_size": ctx.world_size,
                "expert_parallel": ctx.expert_parallel,
                "data_parallel": ctx.data_parallel,
            }
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(run_dir / "summary.json")
    if ctx is not None:  # every rank returns rank 0's summary
        import torch.distributed as dist

        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


def build_summary(cfg: RunConfig, model: GPT, data: TokenData, state: dict, final: dict) -> dict:
    m = cfg.model
    params = model.num_params()
    ept_layers = final["val_experts_per_token"]
    return {
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "unigram_ppl": data.unigram_ppl(),
        "experts_per_token": _mean(ept_layers),
        "experts_per_token_per_layer": ept_layers,
        "moe_compute_ratio": final["val_moe_compute_ratio"],
        "dropped_fraction": _mean(final["val_dropped_fraction"]),
        "load_imbalance": _mean(final["val_load_imbalance"]),
        "load_imbalance_per_layer": final["val_load_imbalance"],
        "null_fraction": _mean(final.get("val_null_fraction", [])),
        "val_tokens": final["val_tokens"],
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "train_time_s": state["train_time_s"],
        "train_tokens_per_s": state["tokens_seen"] / max(state["train_time_s"], 1e-9),
        "params": params,
        "router": m.moe.router,
        "router_options": m.moe.router_options,
        "num_experts": m.moe.num_experts,
        "d_expert": m.moe.d_expert,
        "d_ff": m.d_ff,
        "moe_layers": len(model.moe_layers),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def _global_step_stats(
    loss: torch.Tensor, lm_loss: torch.Tensor, routings, over_time: bool, ctx: ParallelContext
) -> dict:
    """Step metrics over the global batch, from one small all-reduce: losses (mean over
    ranks, i.e. over equal shards), per-layer experts/token and dropped fraction (from summed
    pair / token counts), router losses and extras (mean), and whether any rank is over time."""
    from ..distributed import all_reduce_mean

    names = sorted({k for r in routings for k in r.losses})
    extra_names = sorted({k for r in routings for k in r.extras})
    per_layer = [
        [float(r.num_pairs), float(r.num_selected or 0), float(r.num_tokens)] for r in routings
    ]
    values = [loss.item(), lm_loss.item(), float(over_time)]
    values += [v for layer in per_layer for v in layer]
    router_losses = _router_losses(routings)
    values += [
        router_losses.get(n) if router_losses.get(n) is not None else math.nan for n in names
    ]
    values += [
        float(r.extras[k]) if k in r.extras else math.nan for k in extra_names for r in routings
    ]
    mean = all_reduce_mean(values, ctx)
    loss_v, lm_v, over = mean[:3]
    i = 3
    ept, dropped = [], []
    for _ in routings:
        pairs, selected, tokens = mean[i : i + 3]
        ept.append(pairs / max(tokens, 1e-12))
        dropped.append(0.0 if selected == 0 else 1.0 - pairs / selected)
        i += 3
    losses = {}
    for n in names:
        losses[n] = mean[i] if math.isfinite(mean[i]) else None
        i += 1
    extras = {}
    for k in extra_names:
        extras[k] = [None if math.isnan(v) else v for v in mean[i : i + len(routings)]]
        i += len(routings)
    return {
        "loss": loss_v,
        "lm_loss": lm_v,
        "over_time": over > 0,
        "experts_per_token": ept,
        "dropped_fraction": dropped,
        "router_losses": losses,
        "extras": extras,
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)


def _extras(routings) -> dict[str, list[float]]:
    names = sorted({k for r in routings for k in r.extras})
    return {k: [float(r.extras[k]) if k in r.extras else None for r in routings] for k in names}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _router_losses(routings) -> dict[str, float]:
    totals: dict[str, float] = {}
    for r in routings:
        for name, value in r.losses.items():
            totals[name] = totals.get(name, 0.0) + value.item() / len(routings)
    return {k: (v if math.isfinite(v) else None) for k, v in totals.items()}
