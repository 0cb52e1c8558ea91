"""Early exit (JEI-DNN) as a training task: ``xmoe train --task exit``.

``task_options.backbone`` picks what the exits sit on:

- ``minilm`` (default): the frozen all-MiniLM-L6-v2 (offline, from its package) classifies
  Shakespeare passages by work (42 classes) or genre (4). Its per-layer pooled features are
  computed once and cached in the run's ``data/`` folder; the model trained here is an
  :class:`~xmoe.exit.ExitBank` (IMs + gates for every ``lambdas`` value, plus the baseline
  IMs), so one run gives the whole accuracy-cost curve (``xmoe exit-eval RUN``).
- ``gpt``: the XMoE GPT language model with per-token exits
  (:class:`~xmoe.models.exit_gpt.ExitGPT`); ``model.*`` configures the GPT as for ``lm``.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch
from torch import Tensor

from ..data.corpus import shakespeare_documents
from ..data.passages import GENRES
from ..exit import BankConfig, ExitBank
from ..exit.cost import encoder_layer_flops, gate_flops, im_flops
from ..exit.minilm import Features, load_features, minilm_path
from ..exit.policies import exit_probs, jei_exit
from ..exit.report import Split
from .config import RunConfig
from .exit_lm_task import ExitLMTask
from .exit_options import ExitOptions
from .step_stats import StepOutput


def exit_flops(f: Features, o: ExitOptions, num_classes: int, gates: bool) -> Tensor:
    """``[N, L]`` FLOPs of leaving at each exit: layers 1..l, their IMs and (JEI) gates."""
    d, L = f.h.shape[2], f.h.shape[1]
    layer = encoder_layer_flops(f.tokens.double(), d, f.d_ff)  # [N]
    head = im_flops(d, num_classes, o.im_kind, o.im_hidden)
    per_exit = layer[:, None] + head + torch.zeros(1, L, dtype=torch.float64)
    if gates:
        per_exit[:, :-1] += gate_flops(o.gate_hidden, num_classes)
    return per_exit.cumsum(1)


class ExitTask:
    """A :class:`~xmoe.train.task.Task`; dispatches to the GPT variant for ``backbone=gpt``."""

    Options = ExitOptions

    def __new__(cls, cfg: RunConfig):
        from .tasks import task_options

        options = task_options(cfg)
        if options.backbone == "gpt":
            return ExitLMTask(cfg, options)
        return super().__new__(cls)

    def __init__(self, cfg: RunConfig) -> None:
        from .tasks import task_options

        self.cfg = cfg
        self.o: ExitOptions = task_options(cfg)
        self.features: Features | None = None
        self.tokens_per_step = cfg.train.batch_size  # passages per step

    def bank_config(self, d: int, num_classes: int, num_exits: int) -> BankConfig:
        o = self.o
        return BankConfig(d, num_classes, num_exits, tuple(float(x) for x in o.lambdas),
                          o.im_kind, o.im_hidden, o.gate_hidden, o.mix, o.pos_weight,
                          o.warmup, o.alternate_every)  # fmt: skip

    def build_model(self, step: int) -> ExitBank:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(minilm_path(), local_files_only=True)
        classes = len(shakespeare_documents()) if self.o.label == "work" else len(GENRES)
        return ExitBank(self.bank_config(hf.hidden_size, classes, hf.num_hidden_layers))

    def setup(self, data_dir: Path, model: ExitBank) -> None:
        f = load_features(data_dir, self.o)
        if f.num_classes(self.o.label) != model.cfg.num_classes:
            raise ValueError(f"the cached features have {len(f.works)} works, the corpus more")
        self.features = f
        self.labels = f.labels(self.o.label)
        flops = exit_flops(f, self.o, model.cfg.num_classes, gates=True)
        self.costs = (flops / flops[:, -1:]).float()  # normalised: 1 at the last exit
        self.train_rows, self.val_rows = f.rows("train"), f.rows("val")

    def reshape(self, model: ExitBank, step: int) -> str | None:
        return None

    def train_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        pick = torch.randint(len(self.train_rows), (self.cfg.train.batch_size,), generator=g)
        rows = self.train_rows[pick]
        step_col = torch.full((len(rows),), step, dtype=torch.long)
        return self.features.h[rows].float(), self.labels[rows], self.costs[rows], step_col

    def loss(self, model: ExitBank, batch: tuple[Tensor, ...]) -> StepOutput:
        h, labels, costs, step = batch
        total, values = model.loss(h, labels, costs, int(step[0]))
        return StepOutput(total, values, [])

    def routing_summary(self, model, experts_per_token, dropped_fraction) -> dict:
        return {}

    @torch.no_grad()
    def evaluate(self, model: ExitBank, max_tokens: int | None) -> dict:
        rows = self.val_rows
        h, y, costs = self.features.h[rows].float(), self.labels[rows], self.costs[rows]
        was_training = model.training
        model.eval()
        base = model.baseline(h).logits
        last = base[:, -1].float()
        result = {
            "val_loss": torch.nn.functional.cross_entropy(last, y).item(),
            "val_acc_last": (last.argmax(-1) == y).float().mean().item(),
            "val_jei_acc": [],
            "val_jei_layers": [],
            "val_jei_cost": [],
        }
        result["val_ppl"] = math.exp(result["val_loss"])
        for member in model.members:
            out = member(h)
            exits = jei_exit(out.gates)
            probs = exit_probs(out.logits, exits)
            result["val_jei_acc"].append((probs.argmax(-1) == y).float().mean().item())
            result["val_jei_layers"].append(exits.float().mean().item() + 1)
            result["val_jei_cost"].append(costs[torch.arange(len(y)), exits].mean().item())
        model.train(was_training)
        return result

    def describe(self, result: dict) -> str:
        jei = ", ".join(
            f"{a:.3f}@{c:.2f}" for a, c in zip(result["val_jei_acc"], result["val_jei_cost"])
        )
        return f"val acc last layer {result['val_acc_last']:.3f}; JEI acc@cost {jei}"

    def summary(self, model: ExitBank, state: dict, final: dict) -> dict:
        prior = torch.bincount(self.labels[self.train_rows], minlength=model.cfg.num_classes)
        p = prior.double() / prior.sum()
        prior_ppl = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
        return {
            **final,
            # summary_lines (cli/train.py) reads these LM names: here the last exit's val
            # cross-entropy and the class prior's perplexity
            "unigram_ppl": prior_ppl,
            "label": self.o.label,
            "lambdas": list(model.cfg.lambdas),
            "passages": {s: len(self.features.rows(s)) for s in ("train", "val", "test")},
            "steps": state["step"],
            "tokens_seen": state["tokens_seen"],
            "train_time_s": state["train_time_s"],
            "train_tokens_per_s": state["tokens_seen"] / max(state["train_time_s"], 1e-9),
            "params": sum(p.numel() for p in model.parameters()),
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "machine": platform.machine()},
        }  # fmt: skip


def eval_split(task: ExitTask, split: str, num_classes: int) -> Split:
    """Features, labels and per-exit FLOPs of ``split`` for :mod:`xmoe.exit.report`."""
    f = task.features
    rows = f.rows(split)
    jei = exit_flops(f, task.o, num_classes, gates=True)[rows]
    base = exit_flops(f, task.o, num_classes, gates=False)[rows]
    return Split(f.h[rows].float(), task.labels[rows], jei, base)


def load_exit_run(path: str | Path) -> tuple[ExitTask, ExitBank]:
    """A trained ``minilm`` exit run: its task (features loaded from the run's data dir) and
    its bank at the checkpoint, in eval mode."""
    from .checkpoint import load_weights
    from .run_dir import RunDir

    run = RunDir(path)
    cfg = run.load_config()
    if cfg.task != "exit":
        raise ValueError(f"run dir {str(run.path)!r} is a {cfg.task!r} run, not an exit run")
    task = ExitTask(cfg)
    if not isinstance(task, ExitTask):
        raise ValueError(f"run dir {str(run.path)!r}: exit-eval takes backbone=minilm runs")
    ckpt = run.checkpoint()
    if ckpt is None:
        raise ValueError(f"run dir {str(run.path)!r} has no checkpoint")
    model = task.build_model(run.checkpoint_step())
    load_weights(ckpt, model)
    task.setup(run.data_dir, model)
    return task, model.eval()
