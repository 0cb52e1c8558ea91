"""The XMoE paper's translation comparison at our scale: Folio → modern spelling, MoE in every
second encoder layer, 3 seeds per row (``xmoe translate-compare``; docs/translation.md).

Rows keep the total expert width at E·d_ff (E = 8): top-1 over E experts of width d_ff,
top-2 over 2E of width d_ff/2, XMoE (t = 0.9) over 2E of d_ff/2 and 4E of d_ff/4, and the
dense FFN of width d_ff. Three more rows carry the LM comparison's recipes over: the budget
controller at top-2's active FLOPs on 4E of d_ff/4, and the ``soft_count`` sparsity loss on
4E of d_ff/4 and 2E of d_ff/2.
Every run has its folder ``runs/<row>-s<seed>/``; a run whose
``summary.json`` exists is skipped, one with a checkpoint resumes, so a stopped grid continues
where it stopped. The aligned corpus is built once (``corpus/parallel.json``) and copied into
each run's data folder. ``results.json`` and ``results.md`` are rewritten after every run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .._checks import check_int
from .._io import atomic_write, markdown_table
from .paper import RECIPE, _moe  # a row's model.moe.* overrides and the LM grid's recipe

E, D_FF = 8, 512

# The base of every run (strings nowhere: typed values). A small model, so that one run
# trains and decodes in about 2 CPU-minutes at 1 thread.
BASE: dict[str, object] = {
    "task": "translate",
    "model.vocab_size": 512,  # a small vocabulary: copying is learnt in a few hundred steps
    "model.block_size": 64,
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.d_model": 128,
    "model.d_ff": D_FF,
    "model.moe_every": 2,
    "model.dropout": 0.0,  # 500 steps see a third of an epoch: nothing to regularise
    "train.steps": 500,
    "train.batch_size": 32,
    "train.lr": 2e-3,
    "train.beta2": 0.98,  # fairseq transformer_wmt_en_de
    "train.weight_decay": 0.0,
    "train.warmup_steps": 60,
    "train.eval_every": 100000,
    "train.eval_tokens": 4096,
    "train.eval_batch_size": 64,
    "train.log_every": 50,
    "train.checkpoint_every": 200,
    "train.threads": 1,
    "task_options.beam": 4,
    "task_options.eval_sentences": 400,
}


@dataclass(frozen=True)
class Row:
    name: str
    overrides: dict = field(default_factory=dict)
    encoder_ffn: str = ""


ROWS = [
    Row("dense", {"model.moe_every": 0}, f"dense FFN of width d_ff={D_FF}"),
    Row(
        "top1",
        _moe(E, D_FF, "topk", router_options={"k": 1}, capacity_factor=1.0),
        f"top-1, {E} x {D_FF}, capacity factor 1 in training",
    ),
    Row(
        "top2",
        _moe(2 * E, D_FF // 2, "topk", router_options={"k": 2}),
        f"top-2, {2 * E} x {D_FF // 2}",
    ),
    Row(
        "xmoe16",
        _moe(2 * E, D_FF // 2, "threshold", router_options={"threshold": 0.9}),
        f"XMoE t=0.9, {2 * E} x {D_FF // 2}",
    ),
    Row(
        "xmoe32",
        _moe(4 * E, D_FF // 4, "threshold", router_options={"threshold": 0.9}),
        f"XMoE t=0.9, {4 * E} x {D_FF // 4}",
    ),
    # the LM comparison's recipes (docs/results.md), carried over: the budget controller at
    # top-2's active FLOPs (4 experts of d_ff/4 = 2 of d_ff/2), and the soft_count loss
    Row(
        "xmoe32@top2_flops",
        _moe(
            4 * E,
            D_FF // 4,
            "threshold",
            router_options={"threshold": 0.9, "target_experts_per_token": 4.0},
        ),
        f"XMoE, {4 * E} x {D_FF // 4}, budget controller at 4 experts/token (top-2's FLOPs)",
    ),
    *(
        Row(
            f"xmoe{n}+soft_count",
            _moe(n, 8 * D_FF // n, "threshold", router_options={"threshold": 0.9}, **RECIPE),
            f"XMoE t=0.9, {n} x {8 * D_FF // n}, soft_count sparsity loss 0.01",
        )
        for n in (4 * E, 2 * E)
    ),
]


def row_named(name: str) -> Row:
    names = [r.name for r in ROWS]
    if name not in names:
        raise ValueError(f"row must be one of {names}, got {name!r}")
    return ROWS[names.index(name)]


def run_config(row: Row, seed: int, corpus: Path, steps: int | None, overrides: dict):
    from ..train.config import load_config

    layer = {**BASE, "train.seed": seed, "task_options.corpus_cache": str(corpus)}
    if steps is not None:
        layer["train.steps"] = check_int("steps", steps, 1)
    return load_config(None, layer, row.overrides, overrides)


def run_grid(
    out: Path,
    seeds: int = 3,
    rows: list[str] | None = None,
    steps: int | None = None,
    overrides: dict | None = None,
    command: str = "",
    progress: bool = False,
) -> list[dict]:
    """Train every (row, seed) not yet finished; returns the per-run summaries."""
    from ..data.parallel import load_or_build_corpus
    from ..train.loop import train
    from ..train.run_dir import RunDir

    check_int("seeds", seeds, 1)
    chosen = [row_named(n) for n in rows] if rows else ROWS
    out = Path(out)
    corpus = out / "corpus"
    load_or_build_corpus(corpus)  # once, before the first run; each run copies it
    for seed in range(seeds):  # every row's seed 0 first: a cut-short grid still has all rows
        for row in chosen:
            run = RunDir(out / "runs" / f"{row.name}-s{seed}")
            if run.summary_path.exists():
                continue
            cfg = run_config(row, seed, corpus, steps, overrides or {})
            resume = run.checkpoint() is not None
            train(cfg, run, resume=resume, overwrite=not resume, progress=progress)
            write_results(out, collect(out, chosen, seeds), command)
    results = collect(out, chosen, seeds)
    write_results(out, results, command)
    return results


def collect(out: Path, rows: list[Row], seeds: int) -> list[dict]:
    found = []
    for row in rows:
        for seed in range(seeds):
            path = Path(out) / "runs" / f"{row.name}-s{seed}" / "summary.json"
            if path.exists():
                s = json.loads(path.read_text())
                found.append({"row": row.name, "seed": seed, "encoder_ffn": row.encoder_ffn, **s})
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> list[dict]:
    """One line per row: mean ± std over seeds; then the copy baseline."""
    lines = []
    for name in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == name]
        line = {"row": name, "encoder_ffn": rs[0]["encoder_ffn"], "seeds": len(rs)}
        for key in ("test_bleu", "test_chrf", "val_bleu", "val_loss", "enc_moe_flops_per_token"):
            line[key], line[key + "_std"] = _mean_std([r[key] for r in rs])
        per_layer = [r["experts_per_token_per_layer"] for r in rs]
        enc = rs[0]["encoder_moe_layers"]
        line["ept_per_layer"] = (
            ", ".join(f"{statistics.mean(p[i] for p in per_layer):.2f}" for i in range(enc))
            if enc
            else "-"
        )
        line["train_time_s"] = statistics.mean(r["train_time_s"] for r in rs)
        lines.append(line)
    if results:
        r = results[0]
        lines.append(
            {
                "row": "copy",
                "encoder_ffn": "the source as the output",
                "seeds": 1,
                "test_bleu": r["test_copy_bleu"],
                "test_bleu_std": 0.0,
                "test_chrf": r["test_copy_chrf"],
                "test_chrf_std": 0.0,
                "val_bleu": r["val_copy_bleu"],
                "val_bleu_std": 0.0,
                "ept_per_layer": "-",
            }
        )
    return lines


def results_table(results: list[dict], command: str = "") -> str:
    lines = aggregate(results)
    for line in lines:
        for key, d in (("test_bleu", 2), ("test_chrf", 2), ("val_bleu", 2), ("val_loss", 3)):
            if key in line and line[key] == line[key]:  # not NaN
                line[key + "_pm"] = f"{line[key]:.{d}f} ± {line[key + '_std']:.{d}f}"
        if "enc_moe_flops_per_token" in line:
            line["mflops"] = line["enc_moe_flops_per_token"] / 1e6
    columns = [
        ("row", "row", "{}"),
        ("encoder_ffn", "encoder FFNs", "{}"),
        ("seeds", "seeds", "{}"),
        ("test_bleu_pm", "test BLEU", "{}"),
        ("test_chrf_pm", "test chrF++", "{}"),
        ("val_bleu_pm", "val BLEU (greedy)", "{}"),
        ("val_loss_pm", "val NLL", "{}"),
        ("mflops", "enc MoE MFLOPs/token", "{:.3f}"),
        ("ept_per_layer", "experts/token per MoE layer", "{}"),
        ("train_time_s", "train s", "{:.0f}"),
    ]
    head = f"Command: `{command}`\n\n" if command else ""
    return head + markdown_table(lines, columns)


def write_results(out: Path, results: list[dict], command: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("env",)} for r in results]
    atomic_write(out / "results.json", json.dumps({"command": command, "runs": slim}, indent=1))
    atomic_write(out / "results.md", results_table(results, command))
