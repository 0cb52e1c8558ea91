"""The training loop: AdamW, warmup + cosine, clipping, periodic eval, atomic checkpoints.

``train`` decides once, at setup, which :class:`~xmoe.train.world.World` the run trains in
(one process, or a torch.distributed layout) and what it trains (a
:class:`~xmoe.train.task.Task`; by default the GPT language model); the loop itself only calls
them. The run folder is a :class:`~xmoe.train.run_dir.RunDir`. The batches are a pure function
of the step and the RNG state is checkpointed, so ``resume`` continues a run exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from .checkpoint import load_weights
from .config import RunConfig
from .precision import autocast, resolve_precision
from .run_dir import RunDir
from .schedule import lr_at
from .step_stats import StepStats, mean_or_none
from .task import Task
from .tasks import make_task
from .world import World, make_world

if TYPE_CHECKING:
    from ..distributed import ParallelContext


def train(
    cfg: RunConfig,
    run_dir: str | Path | RunDir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    parallel: ParallelContext | None = None,
    task: Task | None = None,
) -> dict:
    """Train (or resume) a run; returns the summary dict also written to ``summary.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) or with ``parallel.expert_parallel > 1`` the run is
    distributed (docs/distributed.md): the process group is initialised here unless
    ``parallel`` (a :class:`~xmoe.distributed.ParallelContext`) is given. Each rank trains on
    its shard of every global batch; rank 0 logs and writes the (consolidated) checkpoint.
    ``task`` defaults to the one ``cfg.task`` names (train/tasks.py), built on ``cfg``.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg.validate()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world = make_world(cfg, parallel)
    try:
        return _train(cfg, run, task or make_task(cfg), world, resume, overwrite, progress)
    finally:
        world.close()


def _train(
    cfg: RunConfig,
    run: RunDir,
    task: Task,
    world: World,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    # Built before touching the run dir, so bad router options fail fast.
    model = task.build_model(run.checkpoint_step() if resume else 0)

    def start() -> None:
        run.prepare(resume=resume, overwrite=overwrite)
        run.save_config(cfg)

    world.run_on_main(start)
    world.main_first(lambda: task.setup(run.data_dir, model))
    state = {"step": 0, "tokens_seen": 0, "train_time_s": 0.0}
    if resume:  # the checkpoint holds the unsharded model: load it, then lay it out
        load_weights(run.checkpoint(), model)
    world.parallelize(model)
    optimizer = build_optimizer(model, cfg)
    if resume:
        state = world.load_training_state(run.checkpoint(), model, optimizer)
        if world.is_main:
            run.truncate_metrics(state["step"])
    world.seed_rank(t.seed, state["step"])

    def log(record: dict) -> None:
        if world.is_main:
            run.append_metrics(record)

    start_step = state["step"]
    started = time.perf_counter()
    base_time = state["train_time_s"]
    bar = tqdm(
        total=t.steps,
        initial=start_step,
        disable=not (progress and world.is_main),
        desc="train",
        dynamic_ncols=True,
    )
    say = bar.write if world.is_main else (lambda message: None)
    model.train()
    try:
        for step in range(start_step, t.steps):
            note = task.reshape(model, step)
            if note is not None:
                world.parallelize(model)
                optimizer = rebuild_optimizer(optimizer, model, cfg)
                say(f"step {step}: {note}")
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
            with autocast(t.precision):
                out = task.loss(model, world.shard(task.train_batch(step)))
            # all ranks stop at the same step: when any rank's clock is over
            over_time = bool(t.time_limit_s) and time.perf_counter() - started > t.time_limit_s
            stats = StepStats.gather(out, over_time, world.mean)
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"loss became {stats.loss} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            world.reduce_gradients(model)
            grad_norm = world.clip_grad_norm_(model, t.grad_clip) if t.grad_clip > 0 else None
            optimizer.step()
            step_time = time.perf_counter() - step_start
            state["step"] = step + 1
            state["tokens_seen"] += task.tokens_per_step
            state["train_time_s"] = base_time + time.perf_counter() - started

            routing = task.routing_summary(model, stats.experts_per_token, stats.dropped_fraction)
            ept = mean_or_none(stats.experts_per_token)
            bar.update(1)
            bar.set_postfix(
                loss=f"{next(iter(stats.values.values()), stats.loss):.3f}",
                tok_s=f"{task.tokens_per_step / step_time:.0f}",
                ept=f"{ept:.2f}" if ept is not None else "-",
            )
            if (step + 1) % t.log_every == 0 or step == start_step:
                log(
                    {
                        "split": "train",
                        "step": step + 1,
                        "loss": stats.loss,
                        **stats.values,
                        "lr": lr,
                        "grad_norm": None if grad_norm is None else grad_norm.item(),
                        "tokens_per_s": task.tokens_per_step / step_time,
                        "router_losses": stats.router_losses,
                        **stats.extras,
                        **routing,
                    }
                )
            if (step + 1) % t.eval_every == 0 and step + 1 < t.steps and world.evaluates:
                with autocast(t.precision):
                    result = task.evaluate(model, t.eval_tokens)
                log({"split": "val", "step": step + 1, **result})
                say(f"step {step + 1}: {task.describe(result)}")
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                world.save_checkpoint(run.path, model, optimizer, state)
            if stats.over_time:
                say(f"time limit {t.time_limit_s}s reached at step {step + 1}; stopping")
                break
    finally:
        bar.close()
    world.save_checkpoint(run.path, model, optimizer, state)

    summary = None
    if world.evaluates:
        with autocast(t.precision):
            final = task.evaluate(model, None)
        log({"split": "val", "step": state["step"], "final": True, **final})
    if world.is_main:
        summary = task.summary(model, state, final)
        summary.update(world.summary(model))
        summary["precision"] = resolve_precision(t.precision)
        run.write_summary(summary)
    return world.broadcast(summary)  # every rank returns rank 0's summary


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
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


def rebuild_optimizer(
    old: torch.optim.Optimizer, model: torch.nn.Module, cfg: RunConfig
) -> torch.optim.AdamW:
    """A new optimizer over ``model``'s (changed) parameters that keeps the per-parameter state
    (Adam moments, step) of every parameter present in both."""
    new = build_optimizer(model, cfg)
    live = {p for group in new.param_groups for p in group["params"]}
    for p, state in old.state.items():
        if p in live:
            new.state[p] = state
    return new


def notify_step(model: torch.nn.Module, step: int, total_steps: int) -> None:
    """Step callback: every submodule with ``set_step(step, total_steps)`` (schedules such as
    the DTS gate temperature or the local-search annealing) is told the current step."""
    for module in model.modules():
        set_step = getattr(module, "set_step", None)
        if callable(set_step):
            set_step(step, total_steps)
