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

import torch
from tqdm import tqdm

from ..config import RunConfig
from ..data.dataset import TokenData, prepare_data
from ..models.gpt import GPT, routing_summary
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .evo_recipe import EvoRecipe, build_model, carry_optimizer_state
from .schedule import lr_at


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
) -> dict:
    """Train (or resume) a run; returns the summary dict also written to ``summary.json``."""
    run_dir = Path(run_dir)
    cfg.validate()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    recipe = EvoRecipe.from_config(cfg)
    # Built before touching the run dir, so bad router options fail fast.
    model = build_model(cfg, checkpoint_step(run_dir) if resume else 0)
    prepare_run_dir(run_dir, resume, overwrite)
    cfg.save(run_dir / "config.yaml")
    data = load_data(cfg, run_dir)
    fit_token_statistics(model, data)
    optimizer = build_optimizer(model, cfg)
    state = {"step": 0, "tokens_seen": 0, "train_time_s": 0.0}
    if resume:
        state = load_checkpoint(find_checkpoint(run_dir), model, optimizer)
        _truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    tokens_per_step = t.batch_size * cfg.model.block_size

    metrics_file = (run_dir / "metrics.jsonl").open("a")

    def log(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def checkpoint() -> None:
        save_checkpoint(run_dir, model, optimizer, state)

    start_step = state["step"]
    started = time.perf_counter()
    base_time = state["train_time_s"]
    bar = tqdm(
        total=t.steps, initial=start_step, disable=not progress, desc="train", dynamic_ncols=True
    )
    model.train()
    last_eval = None
    try:
        for step in range(start_step, t.steps):
            if recipe is not None and step == recipe.diversify_step:
                recipe.diversify(model)
                new_optimizer = build_optimizer(model, cfg)
                carry_optimizer_state(optimizer, new_optimizer)
                optimizer = new_optimizer
                bar.write(f"step {step}: EvoMoE diversify -> {cfg.model.moe.num_experts} experts")
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
            out = model(x, y)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"loss became {out.loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                if t.grad_clip > 0
                else None
            )
            optimizer.step()
            step_time = time.perf_counter() - step_start
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            state["train_time_s"] = base_time + time.perf_counter() - started

            routing = routing_summary(
                cfg.model,
                model.moe_layers,
                [r.experts_per_token for r in out.routings],
                [r.dropped_fraction for r in out.routings],
            )
            ept = _mean(routing["experts_per_token"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{out.lm_loss.item():.3f}",
                tok_s=f"{tokens_per_step / step_time:.0f}",
                ept=f"{ept:.2f}" if ept is not None else "-",
            )
            if (step + 1) % t.log_every == 0 or step == start_step:
                log(
                    {
                        "split": "train",
                        "step": step + 1,
                        "loss": out.loss.item(),
                        "lm_loss": out.lm_loss.item(),
                        "lr": lr,
                        "grad_norm": None if grad_norm is None else grad_norm.item(),
                        "tokens_per_s": tokens_per_step / step_time,
                        "router_losses": _router_losses(out.routings),
                        **_extras(out.routings),
                        **routing,
                    }
                )
            if (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                last_eval = evaluate(model, data, t.eval_batch_size, t.eval_tokens)
                log({"split": "val", "step": step + 1, **last_eval})
                bar.write(
                    f"step {step + 1}: val_loss {last_eval['val_loss']:.4f} "
                    f"val_ppl {last_eval['val_ppl']:.2f}"
                )
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                checkpoint()
            if t.time_limit_s and time.perf_counter() - started > t.time_limit_s:
                bar.write(f"time limit {t.time_limit_s}s reached at step {step + 1}; stopping")
                break
    finally:
        bar.close()
    checkpoint()

    final = evaluate(model, data, t.eval_batch_size, None)
    log({"split": "val", "step": state["step"], "final": True, **final})
    metrics_file.close()
    summary = build_summary(cfg, model, data, state, final)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "summary.json")
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
