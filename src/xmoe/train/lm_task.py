"""The GPT language model on a token corpus: the task ``xmoe train`` runs.

Batches are a pure function of (seed, step), so a resumed run sees the batches the
uninterrupted run would. EvoMoE runs (``model.moe.evo``) change the model's shape at
``diversify_step``.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import Tensor

from ..data.dataset import TokenData, prepare_data
from ..models.gpt import GPT, routing_summary
from .config import RunConfig
from .evaluate import evaluate
from .evo_recipe import EvoRecipe
from .step_stats import StepOutput, mean_or_none


def evo_recipe(cfg: RunConfig) -> EvoRecipe | None:
    evo = cfg.model.moe.evo
    return None if evo is None else EvoRecipe(evo, cfg.train.seed)


def build_model(cfg: RunConfig, step: int = 0) -> GPT:
    """The GPT in the shape a run has at ``step`` (EvoMoE runs change shape mid-training)."""
    model = GPT(cfg.model)
    recipe = evo_recipe(cfg)
    if recipe is not None:
        recipe.collapse(model)
        if recipe.phase2(step):
            recipe.diversify(model)
    return model


def load_data(cfg: RunConfig, data_dir: Path) -> TokenData:
    """The run's tokenized corpus, cached (with its tokenizer) under ``data_dir``."""
    d = cfg.data
    return prepare_data(data_dir, d.path, d.vocab_size, d.val_fraction)


def fit_token_statistics(model: GPT, data: TokenData) -> None:
    """Give routers that want corpus token counts (frequency-balanced hash) the train counts."""
    routers = [m.router for m in model.moe_layers if hasattr(m.router, "fit_frequencies")]
    if routers:
        vocab = model.cfg.vocab_size
        counts = torch.bincount(torch.from_numpy(data.train.astype("int64")), minlength=vocab)
        for router in routers:
            router.fit_frequencies(counts[:vocab])


class LMTask:
    """Next-token prediction with a :class:`~xmoe.models.GPT`; a :class:`~xmoe.train.task.Task`."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.recipe = evo_recipe(cfg)
        self.data: TokenData | None = None
        self.tokens_per_step = cfg.train.batch_size * cfg.model.block_size

    def build_model(self, step: int) -> GPT:
        return build_model(self.cfg, step)

    def setup(self, data_dir: Path, model: GPT) -> None:
        self.data = load_data(self.cfg, data_dir)
        fit_token_statistics(model, self.data)

    def check_data(self) -> None:
        """At start-up (before the first step): the splits hold a training window and a
        validation block (an optional Task method, see xmoe.train.task)."""
        block, d = self.cfg.model.block_size, self.cfg.data
        source = d.path or "the embedded corpus"
        if len(self.data.train) < block + 2:
            raise ValueError(
                f"data.path ({source}): the training split has {len(self.data.train)} tokens, "
                f"fewer than model.block_size + 2 = {block + 2}; use a larger corpus or a "
                "smaller model.block_size"
            )
        if len(self.data.val) < block + 1:
            raise ValueError(
                f"data.path ({source}): the validation split (data.val_fraction="
                f"{d.val_fraction}) has {len(self.data.val)} tokens, fewer than one block "
                f"(model.block_size + 1 = {block + 1}); raise data.val_fraction, use a larger "
                "corpus or a smaller model.block_size"
            )

    def reshape(self, model: GPT, step: int) -> str | None:
        if self.recipe is None or step != self.recipe.diversify_step:
            return None
        self.recipe.diversify(model)
        return f"EvoMoE diversify -> {self.cfg.model.moe.num_experts} experts"

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        t = self.cfg.train
        return self.data.train_batch(step, t.batch_size, self.cfg.model.block_size, t.seed)

    def loss(self, model: GPT, batch: tuple[Tensor, Tensor]) -> StepOutput:
        x, y = batch
        out = model(x, y)
        return StepOutput(out.loss, {"lm_loss": out.lm_loss}, out.routings)

    def routing_summary(
        self, model: GPT, experts_per_token: list[float], dropped_fraction: list[float]
    ) -> dict:
        return routing_summary(
            self.cfg.model, model.moe_layers, experts_per_token, dropped_fraction
        )

    def evaluate(self, model: GPT, max_tokens: int | None) -> dict:
        return evaluate(model, self.data, self.cfg.train.eval_batch_size, max_tokens)

    def describe(self, result: dict) -> str:
        return f"val_loss {result['val_loss']:.4f} val_ppl {result['val_ppl']:.2f}"

    def summary(self, model: GPT, state: dict, final: dict) -> dict:
        m = self.cfg.model
        ept_layers = final["val_experts_per_token"]
        return {
            "val_loss": final["val_loss"],
            "val_ppl": final["val_ppl"],
            "unigram_ppl": self.data.unigram_ppl(),
            "experts_per_token": mean_or_none(ept_layers),
            "experts_per_token_per_layer": ept_layers,
            "moe_compute_ratio": final["val_moe_compute_ratio"],
            "dropped_fraction": mean_or_none(final["val_dropped_fraction"]),
            "load_imbalance": mean_or_none(final["val_load_imbalance"]),
            "load_imbalance_per_layer": final["val_load_imbalance"],
            "null_fraction": mean_or_none(final.get("val_null_fraction", [])),
            "val_tokens": final["val_tokens"],
            "steps": state["step"],
            "tokens_seen": state["tokens_seen"],
            "train_time_s": state["train_time_s"],
            "train_tokens_per_s": state["tokens_seen"] / max(state["train_time_s"], 1e-9),
            "params": model.num_params(),
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
