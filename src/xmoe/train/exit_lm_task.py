"""``xmoe train --task exit`` with ``backbone=gpt``: the XMoE GPT LM with per-token exits.

:class:`~xmoe.train.exit_task.ExitTask` dispatches here; the options are its
:class:`~xmoe.train.exit_options.ExitOptions`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..exit.distribution import oracle_exit
from ..exit.minilm import copy_cached
from ..exit.objective import gm_loss, im_loss, im_weights
from ..models.exit_gpt import ExitGPT, exit_ce
from ..models.gpt import routing_summary
from .config import RunConfig
from .exit_options import ExitOptions
from .lm_task import fit_token_statistics, load_data
from .step_stats import StepOutput


class ExitLMTask:
    """``backbone=gpt``: the GPT LM with per-token exits (:class:`ExitGPT`).

    Both levels take a step every iteration: the gates' inputs are detached and the IM weights
    are detached, so each loss reaches only its own parameters (the alternation of the
    classification bank with a period of one step; a GM-only step would leave the LM idle).
    The IM (LM) loss is weighted by the exit distribution of the ``lm_lambda_index`` gate set;
    the other sets learn their oracle targets on the same exits. ``lm_gates=false`` trains the
    plain GPT (last-layer cross-entropy only).
    """

    def __init__(self, cfg: RunConfig, options: ExitOptions) -> None:
        if cfg.data.vocab_size != cfg.model.vocab_size:
            raise ValueError(
                f"data.vocab_size ({cfg.data.vocab_size}) must equal model.vocab_size "
                f"({cfg.model.vocab_size})"
            )
        self.cfg = cfg
        self.o = options
        self.data = None
        self.tokens_per_step = cfg.train.batch_size * cfg.model.block_size

    def build_model(self, step: int) -> ExitGPT:
        lambdas = tuple(self.o.lambdas) if self.o.lm_gates else ()
        return ExitGPT(self.cfg.model, lambdas, self.o.gate_hidden)

    def setup(self, data_dir: Path, model: ExitGPT) -> None:
        copy_cached(data_dir, self.o.features_from, ("tokenizer.json", "tokens.npz"))
        self.data = load_data(self.cfg, data_dir)
        fit_token_statistics(model.gpt, self.data)

    def reshape(self, model: ExitGPT, step: int) -> str | None:
        return None

    def train_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        t = self.cfg.train
        x, y = self.data.train_batch(step, t.batch_size, self.cfg.model.block_size, t.seed)
        return x, y, torch.full((x.shape[0],), step, dtype=torch.long)

    def loss(self, model: ExitGPT, batch: tuple[Tensor, ...]) -> StepOutput:
        x, y, step = batch
        logits, routings = model.forward_all(x)
        ce = exit_ce(logits, y)  # [N, L]
        router = model.gpt.router_loss(routings)
        values = {"lm_loss": ce[:, -1].mean().detach()}
        if not model.lambdas:
            return StepOutput(ce[:, -1].mean() + router, values, routings)
        B, T, L, _ = logits.shape
        costs = model.block_costs(routings, torch.Size((B, T))).cumsum(-1).view(B * T, L)
        costs = (costs / model.full_cost(T)).float()
        inf = torch.full((B * T, 1), float("inf"), device=x.device)
        gm_total, gates_im, depth = 0.0, None, 0.0
        for k, lam in enumerate(model.lambdas):
            cols = [model.gate_logit(k, i, logits[:, :, i], logits[:, :, i - 1] if i else None)
                    for i in range(L - 1)]  # fmt: skip
            gate_logits = torch.cat([torch.stack(cols, -1).view(B * T, L - 1), inf], dim=1)
            oracle = oracle_exit(ce.detach(), costs, lam)
            gm_total = gm_total + gm_loss(gate_logits, oracle, self.o.pos_weight)
            if k == self.o.lm_lambda_index:
                gates_im, depth = torch.sigmoid(gate_logits), oracle.float().mean() + 1
        if int(step[0]) < self.o.warmup:
            weights = torch.full_like(ce, 1.0 / L)
        else:
            weights = im_weights(gates_im, self.o.mix)
        loss = im_loss(ce, weights) + router + gm_total
        values.update(gm_loss=gm_total.detach() / len(model.lambdas), oracle_layers=depth)
        return StepOutput(loss, values, routings)

    def routing_summary(self, model: ExitGPT, experts_per_token, dropped_fraction) -> dict:
        return routing_summary(self.cfg.model, model.moe_layers, experts_per_token,
                               dropped_fraction)  # fmt: skip

    @torch.no_grad()
    def evaluate(self, model: ExitGPT, max_tokens: int | None) -> dict:
        """Val perplexity and FLOPs/token without exits and with each gate set's exits."""
        was_training = model.training
        model.eval()
        if max_tokens is None and self.o.lm_final_eval_tokens:
            max_tokens = self.o.lm_final_eval_tokens
        members: list[int | None] = [None, *range(len(model.lambdas))]
        loss = [0.0] * len(members)
        flops = [0.0] * len(members)
        layers = [0.0] * len(members)
        tokens = 0
        t = self.cfg.train
        for x, y in self.data.val_batches(t.eval_batch_size, self.cfg.model.block_size, max_tokens):
            for j, m in enumerate(members):
                out = model.exit_forward(x, m)
                ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
                loss[j] += ce.item()
                flops[j] += out.flops.sum().item()
                layers[j] += (out.exits + 1).sum().item()
            tokens += y.numel()
        model.train(was_training)
        full = model.full_cost(self.cfg.model.block_size)
        return {
            "val_loss": loss[0] / tokens,
            "val_ppl": math.exp(min(loss[0] / tokens, 50.0)),
            "val_flops_per_token": flops[0] / tokens,
            "val_cost": flops[0] / tokens / full,
            "val_exit_ppl": [math.exp(min(v / tokens, 50.0)) for v in loss[1:]],
            "val_exit_flops_per_token": [v / tokens for v in flops[1:]],
            "val_exit_cost": [v / tokens / full for v in flops[1:]],
            "val_exit_layers": [v / tokens for v in layers[1:]],
            "val_tokens": tokens,
        }

    def describe(self, result: dict) -> str:
        ex = ", ".join(f"{p:.1f}@{c:.2f}" for p, c in
                       zip(result["val_exit_ppl"], result["val_exit_cost"]))  # fmt: skip
        return f"val_ppl {result['val_ppl']:.2f} (cost {result['val_cost']:.2f}); exits {ex}"

    def summary(self, model: ExitGPT, state: dict, final: dict) -> dict:
        m = self.cfg.model
        return {
            **final,
            "unigram_ppl": self.data.unigram_ppl(),
            "lambdas": list(model.lambdas),
            "moe": m.moe_every > 0,
            "router": m.moe.router if m.moe_every > 0 else None,
            "full_cost_flops": model.full_cost(m.block_size),
            "n_layer": m.n_layer,
            "steps": state["step"],
            "tokens_seen": state["tokens_seen"],
            "train_time_s": state["train_time_s"],
            "train_tokens_per_s": state["tokens_seen"] / max(state["train_time_s"], 1e-9),
            "params": model.gpt.num_params(),
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        }
