"""Short distillation of the converted experts to the dense model, at a fixed threshold.

Post hoc, dropping experts drops their (small but not zero) contributions, and the error grows
layer after layer. Fine-tuning the expert slices (and the second-layer bias) *with the sparse
routing in place* lets the kept neurons compensate. The teacher is the same model at t = 1
(exactly the dense model) evaluated before any weight changes, so no second copy of the model is
needed. Loss per batch, over non-padding tokens:

    MSE(h_student, h_teacher) / Var(h_teacher)  +  mean(1 - cos(pool(h_student), pool(h_teacher)))

with ``h`` the last hidden states and ``pool`` mean pooling. The routers are not trained (the
threshold selection is not differentiable and kept experts have weight 1). After fine-tuning the
model is no longer exact at t = 1: it is tuned for the chosen threshold.

The caller may pass the teacher's hidden states instead (``teacher``): needed when the model is
no longer the dense one at t = 1 (after ReLU-fication or a refit). ``threshold=None`` keeps each
FFN's own threshold (per-layer thresholds fitted to a FLOP budget). ``params="all"`` also trains
the attention, embeddings and LayerNorms, not only the FFNs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice
from .convert import converted_ffns, set_mode, set_threshold

PARAMS = ("ffn", "all")


def _pool(h: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def distill(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    threshold: float | None,
    steps: int,
    lr: float = 1e-4,
    mode: str = "learned",
    seed: int = 0,
    progress: bool = False,
    teacher: list[Tensor] | None = None,
    params: str = "ffn",
) -> dict:
    """Fine-tune every converted FFN's expert weights and output bias (``params="all"``: every
    parameter but the routers) at ``threshold`` (None: each FFN's current threshold).

    ``teacher``: the dense model's last hidden states for each batch (default: this model at
    t = 1 before any update). Returns ``{"threshold", "steps", "lr", "loss_first",
    "loss_last", ...}`` (mean loss over the first and last 10% of steps). The model is left in
    eval mode at the threshold(s) it was trained at.
    """
    from tqdm.auto import tqdm

    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(
            f"finetune steps (--finetune-steps) must be an integer >= 1, got {steps!r}"
        )
    check_choice("params (--finetune-params)", params, PARAMS)
    ffns = converted_ffns(model)
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no converted FFNs")
    if teacher is not None and len(teacher) != len(batches):
        raise ValueError(f"teacher: got {len(teacher)} hidden states for {len(batches)} batches")
    model.eval()  # no dropout: the teacher and the student see the same function
    set_mode(model, mode)
    thresholds = [f.threshold for f in ffns] if threshold is None else [threshold] * len(ffns)
    if teacher is None:
        with torch.no_grad():
            set_threshold(model, 1.0)
            teacher = [model(**b).last_hidden_state for b in batches]
    for f, t in zip(ffns, thresholds, strict=True):
        f.set_threshold(t)
    routers = {id(p) for f in ffns for p in f.router.parameters()}
    if params == "ffn":
        params_ = [p for f in ffns for n, p in f.named_parameters() if not n.startswith("router.")]
    else:
        params_ = [p for p in model.parameters() if id(p) not in routers]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params_:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params_, lr=lr)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    losses = []
    try:
        for step in tqdm(range(steps), desc="distill", disable=not progress, leave=False):
            i = order[step % len(order)]
            b, t = batches[i], teacher[i]
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].bool()
            mse = ((h - t)[mask] ** 2).mean() / t[mask].var()
            cos = torch.nn.functional.cosine_similarity(_pool(h, mask), _pool(t, mask), dim=-1)
            loss = mse + (1 - cos).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    k = max(1, steps // 10)
    return {
        "threshold": threshold if threshold is not None else "per-layer",
        "router": mode,
        "params": params,
        "steps": steps,
        "lr": lr,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }
