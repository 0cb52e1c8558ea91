"""Calibration text → model inputs, and each FFN's input rows captured from the dense model."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .adapters import find_ffns


def calibration_batches(
    tokenizer, texts: list[str], calib_tokens: int, max_length: int = 128, batch_size: int = 32
) -> list[dict[str, Tensor]]:
    """Take ``texts`` in order until they hold ``calib_tokens`` tokens (each truncated to
    ``max_length``), then batch them grouped by length so that batches carry little padding."""
    chosen, total = [], 0
    for text in texts:
        n = len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        chosen.append((n, text))
        total += n
        if total >= calib_tokens:
            break
    if total < calib_tokens:
        raise ValueError(f"calibration text has only {total} tokens; asked for {calib_tokens}")
    chosen.sort(key=lambda c: c[0])
    batches = []
    for i in range(0, len(chosen), batch_size):
        enc = tokenizer(
            [t for _, t in chosen[i : i + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def _kept_rows(x: Tensor, mask: list[Tensor]) -> Tensor:
    """``x: [B, T, d]`` as ``[N, d]`` fp32 rows, detached, keeping the non-padding positions
    when ``mask`` holds the batch's attention mask ``[B, T]`` (all rows when it is empty)."""
    flat = x.reshape(-1, x.shape[-1])
    if mask:
        flat = flat[mask[0].reshape(-1).bool()]
    return flat.detach().float()


@torch.no_grad()
def capture_ffn_inputs(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    max_tokens: int | None = None,
    progress=False,
) -> list[Tensor]:
    """Run ``model`` on ``batches`` and return each FFN's input rows at non-padding positions:
    one ``[N, d_model]`` fp32 tensor per FFN (in :func:`find_ffns` order)."""
    from tqdm.auto import tqdm

    sites = find_ffns(model)
    store: list[list[Tensor]] = [[] for _ in sites]
    mask_now: list[Tensor] = []

    def hook(i):
        def fn(_module, args):
            store[i].append(_kept_rows(args[0], mask_now))

        return fn

    handles = [
        s.adapter.entry(s.owner).register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            mask_now[:] = [batch["attention_mask"]] if "attention_mask" in batch else []
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = [torch.cat(rows, 0) for rows in store]
    return [x[:max_tokens] for x in out] if max_tokens else out


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@torch.no_grad()
def capture_input(model: nn.Module, module: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    """``module``'s first input rows at non-padding positions over ``batches``: ``[N, d]``
    fp32. Each forward pass stops as soon as ``module`` is reached."""
    rows: list[Tensor] = []
    mask_now: list[Tensor] = []

    def hook(_m, args):
        rows.append(_kept_rows(args[0], mask_now))
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            mask_now[:] = [b["attention_mask"]] if "attention_mask" in b else []
            with contextlib.suppress(_Stop):
                model(**b)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(rows)
