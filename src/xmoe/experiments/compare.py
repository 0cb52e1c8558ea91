"""``xmoe compare``: train several routers on the same GPT / corpus budget and tabulate them.

Every variant starts from the same base config (by default ``configs/demo.yaml``), so all share
the data, the seed, the model shape and the total expert parameters (``num_experts x d_expert``);
a variant only changes ``model.moe`` keys. Results go to ``<out>/results.json`` and
``<out>/results.md``; each variant's run directory is ``<out>/<variant>/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..train.config import load_config

# Named variants: overrides of model.moe (dotted keys relative to model.moe). A plain router
# name not listed here runs that router with its defaults.
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


def variant_overrides(name: str) -> list[str]:
    """``--set`` style overrides for a variant name (a known variant or a router name)."""
    spec = VARIANTS.get(name, {"router": name, "router_options": {}})
    out = []
    for key, value in spec.items():
        out.append(f"model.moe.{key}={json.dumps(value)}")
    return out


def run_comparison(
    variants: list[str],
    out_dir: Path,
    *,
    config: str | None,
    overrides: list[str],
    steps: int | None,
    progress: bool = True,
    command: str = "",
) -> list[dict]:
    from ..train import train

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in variants:
        # Equal budgets: no wall-clock cut-off (the demo config has one), same steps for all.
        extra = ["train.time_limit_s=0", *overrides, *variant_overrides(name)]
        if steps is not None:
            extra.append(f"train.steps={steps}")
        cfg = load_config(config, extra)  # validates before any training starts
        started = time.perf_counter()
        print(f"== {name}: router={cfg.model.moe.router} options={cfg.model.moe.router_options}")
        summary = train(cfg, out_dir / _safe(name), overwrite=True, progress=progress)
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
    _atomic_write(out_dir / "results.json", json.dumps({**meta, "rows": rows}, indent=2))
    _atomic_write(out_dir / "results.md", markdown_table(rows, command))


def markdown_table(rows: list[dict], command: str = "") -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            ok = value is not None and not (isinstance(value, float) and math.isnan(value))
            cells.append(fmt.format(value) if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if command:
        text = f"Command: `{command}`\n\n" + text
    return text


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
