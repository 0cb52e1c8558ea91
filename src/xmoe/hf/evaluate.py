"""Perplexity, experts per token per layer, and forward wall-clock of a patched HF MoE model.

Text is cut into non-overlapping windows of ``seq_len + 1`` tokens; each window predicts its
last ``seq_len`` tokens from the ones before (as ``xmoe train`` evaluates). Perplexity is
``exp`` of the mean next-token NLL over every predicted token.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..data.corpus import load_documents, split_documents
from .block import HFMoE, moe_blocks


def corpus_split(data: str | Path | None, val_fraction: float = 0.05) -> tuple[str, str]:
    """``(train, val)`` text: the tail ``val_fraction`` of every document is val (as
    ``xmoe train`` splits). ``data=None``: the embedded Shakespeare corpus."""
    return split_documents(load_documents(data), val_fraction)


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """``[W, seq_len + 1]`` int64 non-overlapping windows of the text's tokens (no special
    tokens), at most ``max_tokens`` predicted tokens in all."""
    check_int("seq_len", seq_len, 1)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(max_tokens // seq_len, 1))
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    t = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([t[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def batches(windows: Tensor, batch_size: int):
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i : i + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int = 8) -> dict:
    """Perplexity and routed experts/token per MoE layer over ``windows`` (``[W, L + 1]``).

    Returns ``ppl``, ``nll``, ``tokens``, ``experts_per_token`` (per layer),
    ``mean_experts_per_token`` and ``expert_flop_fraction``: routed-expert FLOPs per token over
    those of the native top-k (shared experts excluded; they are the same in both).
    """
    blocks = moe_blocks(model)
    pairs, routed = [0] * len(blocks), [0] * len(blocks)
    nll, count = 0.0, 0
    for w in batches(windows, batch_size):
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        nll += float(loss)
        count += w[:, 1:].numel()
        for i, b in enumerate(blocks):
            pairs[i] += b.last_routing.num_pairs
            routed[i] += b.last_routing.num_tokens
    rates = [p / max(n, 1) for p, n in zip(pairs, routed)]
    out = {"ppl": float(torch.tensor(nll / count).exp()), "nll": nll / count, "tokens": count}
    out.update(rate_summary(blocks, rates))
    return out


def rate_summary(blocks: list[HFMoE], rates: list[float]) -> dict:
    """Mean experts/token and the routed-expert FLOP fraction of native top-k."""
    flops = [b.experts.flops_per_row for b in blocks]
    native = sum(f * b.native_options["k"] for f, b in zip(flops, blocks))
    return {
        "experts_per_token": rates,
        "mean_experts_per_token": sum(rates) / len(rates) if rates else 0.0,
        "expert_flop_fraction": sum(f * r for f, r in zip(flops, rates)) / native
        if native
        else 0.0,
    }


@torch.no_grad()
def time_forwards(
    variants: dict[str, tuple[Callable[[], None] | None, Callable[[], None]]],
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds of each variant's forward ``fn`` (``variants[name] = (setup, fn)``;
    ``setup`` runs untimed before each call). Variants run interleaved, the order rotating
    every repeat, so that machine noise hits them alike."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            setup, fn = variants[n]
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def environment() -> dict:
    """CPU, threads, torch and transformers versions (recorded with every timing)."""
    import transformers

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln]
        flag_line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        cpu = names[0] if names else cpu
        flags = ",".join(f for f in ("avx512_bf16", "amx_bf16") if f in flag_line.split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_bf16_flags": flags or "none",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
