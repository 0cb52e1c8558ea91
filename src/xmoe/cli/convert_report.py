"""What ``xmoe convert`` and ``xmoe convert-eval`` print: a few lines from the manifest and the
evaluation result (the numbers themselves are in the saved JSON)."""

from __future__ import annotations

from pathlib import Path


def convert_lines(model: str, manifest: dict, cfg, out: Path) -> list[str]:
    """The summary of a conversion of ``model`` with ``cfg`` (a ``ConvertConfig``) saved to
    ``out``: the FFNs and experts, then one line per stage that ran."""
    lines = [
        f"converted {model} ({manifest['model_class']}, adapter {manifest['adapter']}): "
        f"{len(manifest['layers'])} FFNs x {cfg.num_experts} experts, split={cfg.split}, "
        f"router={cfg.router}"
    ]
    if cfg.router == "learned":
        key = "router_bce" if cfg.router_target == "select" else "router_kl"
        kls = [lay.get(key) for lay in manifest["layers"]]
        lines.append(f"  {key} per layer: " + ", ".join(f"{k:.4f}" for k in kls))
    if "relufy" in manifest:
        err = manifest["relufy"]["refit"]["rel_error_after"]
        lines.append(
            "  relufied; refit relative error per layer: " + ", ".join(f"{e:.3f}" for e in err)
        )
    if "flop_budget" in manifest:
        fb = manifest["flop_budget"]
        lines.append(
            f"  FLOP budget {fb['budget']:g}: thresholds "
            + ", ".join(f"{t:g}" for t in fb["thresholds"])
            + f" (calibration FLOP fraction {fb['flop_fraction']:.3f})"
        )
    if "refit" in manifest:
        r = manifest["refit"]
        lines.append(
            "  sparse refit relative error per layer: "
            + ", ".join(
                f"{a:.3f}->{b:.3f}"
                for a, b in zip(r["rel_error_before"], r["rel_error_after"], strict=True)
            )
        )
    if "finetune" in manifest:
        ft = manifest["finetune"]
        lines.append(
            f"  distilled at t={ft['threshold']} ({ft['params']}): "
            f"loss {ft['loss_first']:.4f} -> {ft['loss_last']:.4f}"
        )
    lines.append(f"  saved to {out}  (next: xmoe convert-eval {out})")
    return lines


def eval_lines(d: Path, result: dict, speed: bool) -> list[str]:
    """The report of ``evaluate_converted(d, ...)``'s ``result``: the model, the corpus, the
    table of rows (with the speed columns and the timing setup when ``speed``)."""
    from ..convert.evaluate import format_table

    manifest, info = result["manifest"], result["corpus"]
    ft = manifest.get("finetune")
    lines = [
        f"{d}: {manifest['model_class']}, {len(manifest['layers'])} FFNs x "
        f"{manifest['config']['num_experts']} experts, split={manifest['config']['split']}"
        + (f", distilled at t={ft['threshold']}" if ft else ""),
        f"corpus: {info['shakespeare_heldout_lines']} held-out Shakespeare lines + "
        f"{info['stdlib_docstring_sentences']} stdlib docstring sentences; "
        f"reference: {result['reference']}",
        format_table(result["rows"], speed),
    ]
    env = result["environment"]
    if speed:
        lines.append(
            f"speed: {env['device']} {env['dtype']}, {env['threads']} threads, "
            f"torch {env['torch']}; ratio dense/sparse, interleaved, median of repeats"
        )
    lines.append(f"rows: {result['json']}")
    return lines
