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

from .checkpoint import CKPT, load_weights, set_aside_corrupt
from .config import RunConfig
from .precision import autocast, resolve_precision
from .run_dir import RunDir, RunWriter
from .schedule import lr_at
from .step_stats import StepStats, mean_or_none
from .task import Task
from .tasks import make_task
from .tensorboard import TensorBoardLog, summary_writer_class
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
    writer: list[RunWriter] = []  # rank 0's lock on the run dir, held for the run's lifetime
    world.run_on_main(lambda: writer.append(run.writer(resume=resume, overwrite=overwrite)))
    try:
        return _train_locked(cfg, run, task, world, resume, writer[0] if writer else None, progress)
    finally:
        if writer:
            writer[0].abort()  # a no-op once the run has started
            writer[0].close()


def _start(
    cfg: RunConfig, run: RunDir, task: Task, world: World, resume: bool, writer: RunWriter | None
):
    """Everything that can fail before the first step, checked before the run dir is changed
    (but for the data cache, removed again with the run when something fails):
    the checkpoint, the model's shapes against it, the data, the optimizer state."""
    t = cfg.train
    if t.tensorboard:
        summary_writer_class()  # a clear error now when the package is missing
    torch.manual_seed(t.seed)
    snapshot = run.snapshot() if resume else None  # verified; falls back to the previous one
    model = task.build_model(snapshot.step if snapshot else 0)
    if snapshot is not None:  # the checkpoint holds the unsharded model: load it, then lay it out
        load_weights(snapshot, model)
    world.main_first(lambda: task.setup(run.data_dir, model))
    check_data = getattr(task, "check_data", None)  # optional: not every task has one
    if callable(check_data):
        check_data()
    state = {"step": 0, "tokens_seen": 0, "train_time_s": 0.0}
    world.parallelize(model)
    optimizer = build_optimizer(model, cfg)
    if snapshot is not None:
        state = world.load_training_state(snapshot, model, optimizer)

    def commit() -> None:  # the run starts: from here on, its files change
        if snapshot is not None and snapshot.path.name != CKPT:  # the newest failed its check
            set_aside_corrupt(run.path)
        run.save_config(cfg)
        run.truncate_metrics(state["step"])
        writer.commit()

    world.run_on_main(commit)
    tb = None
    if t.tensorboard and world.is_main:
        tb = TensorBoardLog(run.tensorboard_dir, purge_step=snapshot.step + 1 if snapshot else None)
    return model, optimizer, state, tb


def _train_locked(
    cfg: RunConfig,
    run: RunDir,
    task: Task,
    world: World,
    resume: bool,
    writer: RunWriter | None,
    progress: bool,
) -> dict:
    t = cfg.train
    model, optimizer, state, tb = _start(cfg, run, task, world, resume, writer)
    world.seed_rank(t.seed, state["step"])

    def log(record: dict) -> None:
        if world.is_main:
            run.append_metrics(record)
            if tb is not None:
                tb.log(record)

    start_step = state["step"]
    saved_step = start_step if start_step else None  # the step of the newest checkpoint
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
                        "load_imbalance": stats.load_imbalance,
                    }
                )
            if (step + 1) % t.eval_every == 0 and step + 1 < t.steps and world.evaluates:
                with autocast(t.precision):
                    result = task.evaluate(model, t.eval_tokens)
                log({"split": "val", "step": step + 1, **result})
                say(f"step {step + 1}: {task.describe(result)}")
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                world.save_checkpoint(run.path, model, optimizer, state)
                saved_step = state["step"]
                if tb is not None:
                    tb.flush()
            if stats.over_time:
                say(f"time limit {t.time_limit_s}s reached at step {step + 1}; stopping")
                break
    finally:
        bar.close()
        if tb is not None:
            tb.flush()
    if saved_step != state["step"]:  # not just saved (the previous one stays a distinct step)
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
        summary["task"] = cfg.task
        run.write_summary(summary)
    if tb is not None:
        tb.close()
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
