"""The XMoE paper's language-modelling comparison at our scale: equal total expert width, seeds.

``xmoe compare --preset paper --seeds 3`` trains every row of :func:`paper_rows` for each seed
on one base config (``configs/paper.yaml``: a GPT with MoE in every second block), then writes
``results.json``, ``results.md`` and ``pareto.png`` (validation perplexity against active MoE
FLOPs per token, mean ± std over seeds) into the output folder.

The total expert width is fixed at 8·d_ff, scaling the paper's table (Switch 8×3072, top-2
16×1536, XMoE 16×1536 / 32×768 / 64×384) down to d_ff = 512. The grid is resumable: each run
has its own folder ``runs/<row>-s<seed>/``, a run whose ``summary.json`` exists is skipped, and
the result files are rewritten after every run, so an interrupted grid continues where it
stopped.

``xmoe compare --preset paper-ablation --seeds 1`` runs :func:`ablation_rows` the same way: one
seed of XMoE-64 over the choices where the XMoE reference code may differ from xmoe's defaults
(issue 13, part C), the sparsity regularisers and the budget controller. The recipe it chose
(:data:`RECIPE`) is the paper grid's second pass (:func:`recipe_rows`).
"""

from __future__ import annotations

import math

from .._checks import check_choice
from .grid import Row, aggregate, run_grid  # noqa: F401 (re-exported for callers of paper)

PAPER_CONFIG = "configs/paper.yaml"


def _moe(num_experts: int, d_expert: int, router: str, **extra) -> dict:
    out = {
        "model.moe.num_experts": num_experts,
        "model.moe.d_expert": d_expert,
        "model.moe.router": router,
    }
    out.update({f"model.moe.{k}": v for k, v in extra.items()})
    return out


def paper_rows(d_ff: int = 512, recipe: dict | None = None) -> list[Row]:
    """The rows at total expert width 8·d_ff. ``recipe`` adds ``model.moe`` overrides (typed
    values, e.g. ``{"loss_coefs": {...}}``) to every XMoE row: the second pass of the issue."""
    thr = {"threshold": 0.9}
    xr = {k: v for k, v in (recipe or {}).items()}
    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)  # experts of width d_ff/8 at top-2's FLOPs
    return [
        Row("dense", {"model.moe_every": 0}, "dense FFN of width d_ff in every block"),
        Row(
            "switch",
            _moe(8, d_ff, "switch", router_options={}, capacity_factor=1.25),
            "top-1, cf 1.25",
        ),
        Row("top2", _moe(16, d_ff // 2, "topk", router_options={"k": 2}), "the paper's top-k"),
        Row("xmoe16", _moe(16, d_ff // 2, "threshold", router_options=thr, **xr)),
        Row("xmoe32", _moe(32, d_ff // 4, "threshold", router_options=thr, **xr)),
        Row("xmoe64", _moe(64, d_ff // 8, "threshold", router_options=thr, **xr)),
        Row(
            "xmoe64+soft_count",
            _moe(
                64,
                d_ff // 8,
                "threshold",
                router_options=thr,
                **{**xr, "loss_coefs": {**xr.get("loss_coefs", {}), "soft_count": 0.01}},
            ),
            "sparsity regulariser",
        ),
        Row(
            "xmoe64@top2_flops",
            _moe(
                64,
                d_ff // 8,
                "threshold",
                router_options={**thr, "target_experts_per_token": top2_ept},
                **xr,
            ),
            f"budget controller: {top2_ept:g} experts/token = top-2's active FLOPs",
        ),
        *recipe_rows(d_ff),
        *granularity_rows(d_ff),
    ]


def granularity_rows(d_ff: int = 512) -> list[Row]:
    """Expert size at equal active FLOPs: XMoE-16 and XMoE-32 held at top-2's active FLOPs by
    the budget controller, beside the first pass's ``xmoe64@top2_flops``. Same router, same
    total width and the same active width per token; only the expert size differs. Then
    XMoE-16 and XMoE-32 with the ``soft_count`` loss, beside ``xmoe64+soft_count``."""
    top2_width = 2 * (8 * d_ff // 16)  # hidden units per token of top-2 over 16 x d_ff/2
    rows = []
    for n in (16, 32):
        target = top2_width / (8 * d_ff // n)
        opts = {"threshold": 0.9, "target_experts_per_token": target}
        rows.append(
            Row(
                f"xmoe{n}@top2_flops",
                _moe(n, 8 * d_ff // n, "threshold", router_options=opts),
                f"budget controller: {target:g} experts/token = top-2's active FLOPs",
                group="granularity at top-2 FLOPs",
            )
        )
    for n in (16, 32):  # the same question under the sparsity recipe (xmoe64+soft_count's)
        rows.append(
            Row(
                f"xmoe{n}+soft_count",
                _moe(
                    n,
                    8 * d_ff // n,
                    "threshold",
                    router_options={"threshold": 0.9},
                    **RECIPE,
                ),
                "sparsity regulariser",
                group="granularity with soft_count",
            )
        )
    return rows


RECIPE = {"loss_coefs": {"soft_count": 0.01}}
"""The second pass's XMoE recipe (``model.moe`` overrides), chosen by the ``paper-ablation``
preset (docs/results.md): the ``soft_count`` sparsity loss at 0.01 on xmoe's defaults. XMoE-64
with it alone is the first pass's ``xmoe64+soft_count`` row."""


def recipe_rows(d_ff: int = 512, recipe: dict | None = None) -> list[Row]:
    """The second pass: XMoE-64 with ``recipe`` (default :data:`RECIPE`) held at top-2's active
    FLOPs by the budget controller."""
    recipe = RECIPE if recipe is None else recipe
    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)
    opts = {"threshold": 0.9, "target_experts_per_token": top2_ept}
    return [
        Row(
            "xmoe64+recipe@top2_flops",
            _moe(64, d_ff // 8, "threshold", router_options=opts, **recipe),
            f"recipe + budget controller at {top2_ept:g} experts/token",
            group="second pass (recipe)",
        ),
    ]


def ablation_rows(d_ff: int = 512, d_model: int = 128) -> list[Row]:
    """Part C of issue 13: XMoE-64 (64 experts of width d_ff/8, t = 0.9) with one choice changed
    per row against xmoe's defaults, then the sparsity regularisers and the budget controller.

    xmoe's defaults already match three of the reference code's choices (f_i of the load-balance
    loss from each token's top-1 argmax, coefficient 0.01, raw-probability combine weights:
    ``balance_over="top1"``, ``loss_coefs.load_balance``, ``renormalize=False``), so they need
    no row; the reference's capacity factor 8 and nn.Linear init (kaiming-uniform, std
    1/sqrt(3·d_model)) are rows of their own and, together, ``reference``.
    """
    linear_std = 1.0 / math.sqrt(3 * d_model)  # nn.Linear's U(-1/sqrt(d), 1/sqrt(d))

    def x64(router_options: dict | None = None, **extra) -> dict:
        opts = {"threshold": 0.9, **(router_options or {})}
        return _moe(64, d_ff // 8, "threshold", router_options=opts, **extra)

    top2_ept = 2 * (8 * d_ff // 16) / (d_ff // 8)
    return [
        Row(
            "default",
            x64(),
            "xmoe: f_i from top-1 argmax, coef 0.01, dropless, init 3/sqrt(d), raw probs",
        ),
        Row("cf8", x64(capacity_factor=8.0), "reference: train capacity factor 8 (drops)"),
        Row(
            "linear_init",
            x64({"init_std": round(linear_std, 5)}),
            f"reference: nn.Linear init std 1/sqrt(3d) = {linear_std:.3f}",
        ),
        Row(
            "reference",
            x64({"init_std": round(linear_std, 5)}, capacity_factor=8.0),
            "the reference's choices together (cf 8 + nn.Linear init)",
        ),
        Row("soft_count=0.003", x64(loss_coefs={"soft_count": 0.003}), "sparsity regulariser"),
        Row("soft_count=0.01", x64(loss_coefs={"soft_count": 0.01}), "sparsity regulariser"),
        Row("entropy=0.01", x64(loss_coefs={"entropy": 0.01}), "sparsity regulariser"),
        Row(
            "budget=2",
            x64({"target_experts_per_token": 2.0}),
            f"budget controller: 2 experts/token = {2 / top2_ept:g}x top-2's FLOPs",
        ),
        Row(
            f"budget={top2_ept:g}",
            x64({"target_experts_per_token": top2_ept}),
            "budget controller at top-2's active FLOPs",
        ),
    ]


PRESETS = ("paper", "paper-ablation")


def preset_rows(preset: str, d_ff: int, d_model: int) -> list[Row]:
    """The rows of ``xmoe compare --preset NAME`` for a base config's d_ff and d_model."""
    check_choice("preset", preset, PRESETS)
    if preset == "paper-ablation":
        return ablation_rows(d_ff, d_model)
    return paper_rows(d_ff)
