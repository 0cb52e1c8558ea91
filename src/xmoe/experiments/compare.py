"""``xmoe compare``: train several routers on the same GPT / corpus budget and tabulate them.

Every variant starts from the same base config (by default ``configs/demo.yaml``), so all share
the data, the seed, the model shape and the total expert parameters (``num_experts x d_expert``);
a variant only changes ``model.moe`` keys, and the wall-clock limit is lifted (equal budgets).
Results go to ``<out>/results.json`` and ``<out>/results.md``; each variant's run directory is
``<out>/<variant>/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .._io import atomic_write, markdown_table
from ..models import GPT
from ..train.config import RunConfig, load_config
from ..train.loop import train
from ..train.run_dir import RunDir

# Named variants: overrides of model.moe (keys relative to model.moe). A plain router name not
# listed here runs that router with its defaults.
VARIANTS: dict[str, dict] = {
    "switch": {"router": "switch", "router_options": {}},
    "gshard": {"router": "gshard", "router_options": {}},
    "topk": {"router": "topk", "router_options": {"k": 2}},
    "noisy_topk": {"router": "noisy_topk", "router_options": {"k": 2}},
    "threshold": {"router": "threshold", "router_options": {"threshold": 0.9}},
    "expert_choice": {"router": "expert_choice", "router_options": {}},
    "hash": {"router": "hash", "router_options": {}},
    "hash_freq": {"router": "hash", "router_options": {"balance": "frequency"}},
    "base": {"router": "base", "router_options": {}},
    "threshold+soft_count": {
        "router": "threshold",
        "router_options": {"threshold": 0.9},
        "loss_coefs": {"soft_count": 0.01},
    },
    "threshold+entropy": {
        "router": "threshold",
        "router_options": {"threshold": 0.9},
        "loss_coefs": {"entropy": 0.01},
    },
    "threshold+null": {
        "router": "threshold",
        "router_options": {"threshold": 0.9, "num_null_experts": 4},
    },
    "dselect_k": {"router": "dselect_k", "router_options": {"k": 2}},
    "comet": {"router": "comet", "router_options": {"k": 2}},
    "comet+local_search": {
        "router": "comet",
        "router_options": {"k": 2},
        "local_search": {"search_fraction": 0.1},
    },
    "topk+local_search": {
        "router": "topk",
        "router_options": {"k": 2},
        "local_search": {"search_fraction": 0.1},
    },
    "evomoe": {
        "router": "dts",
        "router_options": {"renormalize": True},
        "evo": {"diversify_step": 100, "mask_ratio": 0.5},
    },
    "threshold+loss_free": {
        "router": "threshold",
        "router_options": {"threshold": 0.9, "loss_free_balance": True},
    },
}

COLUMNS = [
    ("variant", "variant", "{}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("experts_per_token", "experts/token", "{:.2f}"),
    ("moe_compute_ratio", "moe_compute_ratio", "{:.3f}"),
    ("load_imbalance", "load imbalance (max/mean)", "{:.2f}"),
    ("dropped_fraction", "dropped", "{:.3f}"),
    ("null_fraction", "null hits", "{:.3f}"),
    ("train_time_s", "train s", "{:.0f}"),
]


def variant_overrides(name: str) -> dict[str, object]:
    """The config overrides of a variant name (a known variant or a router name)."""
    spec = VARIANTS.get(name, {"router": name, "router_options": {}})
    return {f"model.moe.{key}": value for key, value in spec.items()}


def variant_configs(
    variants: list[str],
    *,
    config: str | Path | None,
    overrides: Mapping[str, object],
    steps: int | None,
) -> dict[str, RunConfig]:
    """Each variant's validated config: ``config`` ← no time limit ← ``overrides`` ← the
    variant ← ``steps``. Every model is built once, so a bad variant fails before any
    training."""
    configs = {}
    for name in variants:
        extra = {} if steps is None else {"train.steps": steps}
        cfg = load_config(
            config, {"train.time_limit_s": 0.0}, overrides, variant_overrides(name), extra
        )
        GPT(cfg.model)  # router names and options are checked when the model is built
        configs[name] = cfg
    return configs


def run_comparison(
    configs: Mapping[str, RunConfig],
    out_dir: Path,
    *,
    progress: bool = True,
    command: str = "",
) -> list[dict]:
    """Train every variant (``out_dir/<variant>/``) and write the results after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg in configs.items():
        started = time.perf_counter()
        print(f"== {name}: router={cfg.model.moe.router} options={cfg.model.moe.router_options}")
        summary = train(cfg, RunDir(out_dir / _safe(name)), overwrite=True, progress=progress)
        rows.append(
            {
                "variant": name,
                "router": cfg.model.moe.router,
                "router_options": cfg.model.moe.router_options,
                "loss_coefs": cfg.model.moe.loss_coefs,
                **{k: summary.get(k) for k, *_ in COLUMNS if k != "variant"},
                "wall_s": time.perf_counter() - started,
            }
        )
        write_results(out_dir, rows, command)
    return rows


def write_results(out_dir: Path, rows: list[dict], command: str) -> None:
    meta = {
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write(out_dir / "results.json", json.dumps({**meta, "rows": rows}, indent=2))
    atomic_write(out_dir / "results.md", results_table(rows, command))


def results_table(rows: list[dict], command: str = "") -> str:
    text = markdown_table(rows, COLUMNS)
    return f"Command: `{command}`\n\n" + text if command else text


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
