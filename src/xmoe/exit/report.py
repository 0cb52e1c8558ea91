"""Every exit policy of an :class:`~.bank.ExitBank` on a test split: accuracy, mean cost, ECE
and split-conformal set size, as rows; the curves and reliability diagrams as PNGs.

Each policy is calibrated (conformal quantile) on the validation split with the same policy,
then measured on the test split. Costs are per input: layers executed and FLOPs (backbone
layers + IMs, + gates for JEI-DNN), also as a fraction of the full-depth baseline's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._io import atomic_write, markdown_table
from .bank import ExitBank
from .metrics import accuracy, conformal_quantile, conformal_sets, conformal_summary, reliability
from .policies import confidence_exit, entropy_exit, exit_probs, fixed_exit, jei_exit

CONFIDENCE_TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
ENTROPY_TAUS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01)


@dataclass
class Split:
    h: Tensor  # [N, L, d]
    labels: Tensor  # [N]
    flops_jei: Tensor  # [N, L] cumulative FLOPs of leaving at each exit (with gates)
    flops_base: Tensor  # [N, L] (IMs only)


def _policies(model: ExitBank, s: Split):
    """(method, param, exits, logits, flops) for every policy on split ``s``."""
    base = model.baseline(s.h).logits
    for lam, member in zip(model.cfg.lambdas, model.members):
        out = member(s.h)
        yield "jei", lam, jei_exit(out.gates), out.logits, s.flops_jei
    for tau in CONFIDENCE_TAUS:
        yield "confidence", tau, confidence_exit(base, tau), base, s.flops_base
    for tau in ENTROPY_TAUS:
        yield "entropy", tau, entropy_exit(base, tau), base, s.flops_base
    L = base.shape[1]
    for layer in range(L):
        method = "last-layer" if layer == L - 1 else "fixed"
        yield method, layer + 1, fixed_exit(len(s.labels), layer, L), base, s.flops_base


@torch.no_grad()
def evaluate_policies(model: ExitBank, val: Split, test: Split, alpha: float = 0.1) -> list[dict]:
    """One row per policy: test accuracy, layers, FLOPs, ECE, conformal set size/coverage."""
    model.eval()
    full = test.flops_base[:, -1].mean().item()
    rows = []
    pairs = zip(_policies(model, val), _policies(model, test))
    for (method, param, v_exits, v_logits, _), (_, _, exits, logits, flops) in pairs:
        q = conformal_quantile(exit_probs(v_logits, v_exits), val.labels, alpha)
        probs = exit_probs(logits, exits)
        conf = conformal_summary(conformal_sets(probs, q), test.labels)
        spent = flops[torch.arange(len(exits)), exits]
        rel = reliability(probs, test.labels)
        rows.append(
            {
                "method": method,
                "param": param,
                "accuracy": accuracy(probs, test.labels),
                "layers": exits.float().mean().item() + 1,
                "mflops": spent.mean().item() / 1e6,
                "cost": spent.mean().item() / full,
                "ece": rel.ece,
                "set_size": conf["set_size"],
                "coverage": conf["coverage"],
                "reliability": rel,
            }
        )
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both lower cost and higher accuracy, by cost."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["cost"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def accuracy_at(rows: list[dict], cost: float) -> float | None:
    """A method's best accuracy at mean cost ``cost``: linear between neighbours on its Pareto
    front, the front's best beyond its last point (a cheaper setting is always allowed), None
    below its cheapest point."""
    front = pareto(rows)
    if not front or cost < front[0]["cost"] - 1e-12:
        return None
    for a, b in zip(front, front[1:]):
        if a["cost"] <= cost <= b["cost"]:
            t = (cost - a["cost"]) / max(b["cost"] - a["cost"], 1e-12)
            return a["accuracy"] + t * (b["accuracy"] - a["accuracy"])
    return front[-1]["accuracy"]


def equal_cost(rows: list[dict]) -> list[dict]:
    """Per JEI-DNN point: the thresholding baselines' accuracy at the same mean cost."""
    by = {m: [r for r in rows if r["method"] == m] for m in ("confidence", "entropy")}
    out = []
    for r in (r for r in rows if r["method"] == "jei"):
        conf, ent = accuracy_at(by["confidence"], r["cost"]), accuracy_at(by["entropy"], r["cost"])
        out.append({"lambda": r["param"], "cost": r["cost"], "jei": r["accuracy"],
                    "confidence": conf, "entropy": ent})  # fmt: skip
    return out


COLUMNS = [
    ("method", "method", "{}"),
    ("param", "λ / τ / layer", "{:g}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("layers", "mean layers", "{:.2f}"),
    ("mflops", "mean MFLOPs", "{:.1f}"),
    ("cost", "cost (x full)", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("set_size", "conformal set (90%)", "{:.2f}"),
    ("coverage", "coverage", "{:.3f}"),
]
EQUAL_COLUMNS = [
    ("lambda", "λ", "{:g}"),
    ("cost", "cost (x full)", "{:.3f}"),
    ("jei", "JEI-DNN acc", "{:.3f}"),
    ("confidence", "confidence acc", "{:.3f}"),
    ("entropy", "entropy acc", "{:.3f}"),
]


def write_report(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    """``table.md``, ``rows.json``, ``curve.png`` and ``reliability.png`` under ``out``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, COLUMNS)
    eq = markdown_table(equal_cost(rows), EQUAL_COLUMNS)
    note = "At equal mean cost (baselines interpolated on their Pareto front):"
    md = f"# {title}\n\n{table}\n{note}\n\n{eq}"
    paths = {"table": atomic_write(out / "table.md", md)}
    plain = [{k: v for k, v in r.items() if k != "reliability"} for r in rows]
    paths["rows"] = atomic_write(out / "rows.json", json.dumps(plain, indent=1))
    paths.update(plot(rows, out, title))
    return paths


def pick_reliability_rows(rows: list[dict]) -> list[dict]:
    """The most accurate JEI-DNN point that saves compute (cost < 0.95; else its middle one),
    the thresholding baselines nearest its cost, and the last layer."""
    jei = [r for r in rows if r["method"] == "jei"]
    saving = [r for r in jei if r["cost"] < 0.95]
    mid = max(saving, key=lambda r: r["accuracy"]) if saving else jei[len(jei) // 2]
    picked = [mid]
    for m in ("confidence", "entropy"):
        cands = [r for r in rows if r["method"] == m]
        picked.append(min(cands, key=lambda r: abs(r["cost"] - mid["cost"])))
    picked.append(next(r for r in rows if r["method"] == "last-layer"))
    return picked


def plot(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"jei": "o-", "confidence": "s--", "entropy": "^--", "fixed": "x:"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in styles.items():
        rs = sorted((r for r in rows if r["method"] in (method, "last-layer" if method == "fixed"
                     else "")), key=lambda r: r["cost"])  # fmt: skip
        label = "JEI-DNN (λ)" if method == "jei" else method
        axes[0].plot([r["cost"] for r in rs], [r["accuracy"] for r in rs], style, label=label)
        axes[1].plot([r["cost"] for r in rs], [r["ece"] for r in rs], style, label=label)
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("test ECE (15 bins)")
    for ax in axes:
        ax.set_xlabel("mean FLOPs / full-depth FLOPs")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    curve = out / "curve.png"
    fig.savefig(curve, dpi=110)
    plt.close(fig)

    picked = pick_reliability_rows(rows)
    fig, axes = plt.subplots(1, len(picked), figsize=(3.3 * len(picked), 3.3))
    for ax, r in zip(axes, picked):
        rel = r["reliability"]
        width = rel.edges[1] - rel.edges[0]
        centers = [e + width / 2 for e in rel.edges[:-1]]
        acc = [a if a is not None else 0.0 for a in rel.accuracy]
        ax.bar(centers, acc, width=width * 0.95, alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{r['method']} {r['param']:g}\ncost {r['cost']:.2f}, ECE {r['ece']:.3f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy in bin")
    fig.tight_layout()
    diagram = out / "reliability.png"
    fig.savefig(diagram, dpi=110)
    plt.close(fig)
    return {"curve": curve, "reliability": diagram}


# ------------------------------------------------------------------ the GPT with exits (LM)

LM_COLUMNS = [
    ("setting", "setting", "{}"),
    ("lambda", "λ", "{:g}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("layers", "mean layers", "{:.2f}"),
    ("mflops", "MFLOPs / token", "{:.3f}"),
    ("cost", "cost (x dense full depth)", "{:.3f}"),
]


def lm_rows(name: str, summary: dict) -> list[dict]:
    """Rows of one ``backbone=gpt`` run's final evaluation: full depth, then each gate set."""
    n_layer = summary.get("n_layer")
    mflops = summary["val_flops_per_token"] / 1e6
    rows = [{"setting": name, "lambda": None, "val_ppl": summary["val_ppl"], "layers": n_layer,
             "mflops": mflops, "cost": summary["val_cost"]}]  # fmt: skip
    for lam, ppl, fl, cost, layers in zip(
        summary["lambdas"], summary["val_exit_ppl"], summary["val_exit_flops_per_token"],
        summary["val_exit_cost"], summary["val_exit_layers"],
    ):  # fmt: skip
        rows.append({"setting": name, "lambda": lam, "val_ppl": ppl, "layers": layers,
                     "mflops": fl / 1e6, "cost": cost})  # fmt: skip
    return rows


def plot_lm(rows: list[dict], out: Path, title: str) -> Path:
    """Val perplexity against compute per token, one series per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in rs], [r["val_ppl"] for r in rs], "o-", label=setting)
        for r in rs:
            if r["lambda"] is not None:
                ax.annotate(f"λ={r['lambda']:g}", (r["cost"], r["val_ppl"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("FLOPs per token / dense full-depth FLOPs (attention + FFN/experts)")
    ax.set_ylabel("val perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "lm_compute.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
