"""Least-squares refit of each converted FFN's second layer at its own sparse routing.

Dropping experts removes their part of the FFN output. For a fixed first layer (which neurons
fire, and which experts the router keeps), the best second layer is a linear least-squares
problem: with ``a = act(x W1ᵀ + b1)`` masked to the kept experts' neurons,

    min_{W2, b2}  sum_tokens ||a_masked W2ᵀ + b2 - target||²  +  λ ||W2 - W2_old||²

whose normal equations are solved in closed form (float64). The ridge term pulls toward the
current weights, so neurons that are rarely kept keep their old columns; ``λ = ridge`` times the
mean diagonal of the Gram matrix.

The refit is *sequential* (as in GPTQ / SparseGPT): layer l is refitted on the inputs that the
already-refitted layers 0..l-1 produce, so each layer compensates for the error upstream. The
target is the *reference* model's FFN output at the reference model's own input. For post-LN
blocks where the residual added to the FFN output is the FFN input itself (BERT:
``LayerNorm(ffn(x) + x)``), the target also carries the upstream error ``x_ref - x``, so the
refitted layer puts the residual stream back where the reference had it
(``residual=True``).

The same routine, run in ``dense`` mode, is the recovery step of ReLU-fication
(:mod:`.relufy`): the ReLU layer's second layer is refitted to the GELU layer's outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive
from .calibrate import capture_input
from .convert import converted_ffns

CHUNK = 4096  # rows per Gram-matrix update


@torch.no_grad()
def solve_second_layer(
    acts: Tensor, target: Tensor, w_old: Tensor, b_old: Tensor | None, ridge: float
) -> tuple[Tensor, Tensor | None]:
    """Ridge least squares toward the old weights.

    ``acts: [N, f]`` (masked activations), ``target: [N, d]``, ``w_old: [f, d]``, ``b_old: [d]``
    or None. Returns ``(w [f, d], b [d] or None)`` minimising
    ``||acts w + b - target||² + λ ||w - w_old||²`` with ``λ = ridge * mean(diag(actsᵀ acts))``;
    the bias is not penalised.
    """
    f = acts.shape[1]
    bias = b_old is not None
    k = f + int(bias)
    gram = torch.zeros(k, k, dtype=torch.float64)
    rhs = torch.zeros(k, target.shape[1], dtype=torch.float64)
    for a, t in zip(acts.split(CHUNK), target.split(CHUNK), strict=True):
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        gram += (a.T @ a).double()
        rhs += (a.T @ t).double()
    lam = ridge * float(gram.diagonal()[:f].mean().clamp_min(1e-12))
    idx = torch.arange(f)
    gram[idx, idx] += lam
    rhs[:f] += lam * w_old.double()
    sol = torch.linalg.solve(gram, rhs).float()
    return sol[:f], (sol[f] if bias else None)


@torch.no_grad()
def refit_second_layers(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    ref_inputs: list[Tensor],
    ref_outputs: list[Tensor],
    ridge: float = 1e-2,
    residual: bool = False,
    progress: bool = False,
) -> dict:
    """Refit every converted FFN's ``w2`` and output bias, layer by layer, at its current mode
    and threshold (see the module docstring).

    Args:
        model: the converted model (changed in place).
        batches: calibration batches (the rows of ``ref_*`` are their non-padding positions, in
            order).
        ref_inputs, ref_outputs: per FFN, the reference model's FFN input and output rows.
        ridge: relative ridge strength (> 0).
        residual: add the upstream input error to the target (post-LN residual on the FFN
            input, e.g. BERT).

    Returns ``{"ridge", "residual", "rel_error_before", "rel_error_after"}`` with per-layer
    relative errors ``||y - target|| / ||target||`` on the calibration rows.
    """
    from tqdm.auto import tqdm

    check_positive("ridge (--refit-ridge)", ridge)
    ffns = converted_ffns(model)
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no converted FFNs")
    if not (len(ref_inputs) == len(ref_outputs) == len(ffns)):
        raise ValueError(
            f"got reference rows for {len(ref_inputs)}/{len(ref_outputs)} FFNs, "
            f"model has {len(ffns)}"
        )
    before, after = [], []
    for ffn, x_ref, y_ref in tqdm(
        list(zip(ffns, ref_inputs, ref_outputs, strict=True)),
        desc="refit",
        disable=not progress,
        leave=False,
    ):
        x = capture_input(model, ffn, batches)
        if x.shape != x_ref.shape:
            raise ValueError(
                f"captured {tuple(x.shape)} FFN input rows, reference has {tuple(x_ref.shape)}"
            )
        target = y_ref + (x_ref - x) if residual else y_ref
        mask = torch.cat([ffn.keep_mask(c) for c in x.split(CHUNK)])  # [N, E]
        dense = ffn.to_dense()
        acts = torch.cat(
            [
                dense.neuron_acts(c).float().view(-1, ffn.num_experts, ffn.d_expert)
                * m.unsqueeze(-1)
                for c, m in zip(x.split(CHUNK), mask.split(CHUNK), strict=True)
            ]
        ).view(x.shape[0], -1)
        w_old = ffn.experts.w2.detach().reshape(-1, ffn.d_model).float()  # [d_ff, d] slot order
        b_old = None if ffn.out_bias is None else ffn.out_bias.detach().float()
        before.append(_rel_error(acts, w_old, b_old, target))
        w, b = solve_second_layer(acts, target, w_old, b_old, ridge)
        after.append(_rel_error(acts, w, b, target))
        ffn.experts.w2.copy_(w.view_as(ffn.experts.w2))
        if b is not None:
            ffn.out_bias.copy_(b)
    return {
        "ridge": ridge,
        "residual": residual,
        "rel_error_before": [round(e, 5) for e in before],
        "rel_error_after": [round(e, 5) for e in after],
    }


def _rel_error(acts: Tensor, w: Tensor, b: Tensor | None, target: Tensor) -> float:
    num = den = 0.0
    for a, t in zip(acts.split(CHUNK), target.split(CHUNK), strict=True):
        y = a @ w if b is None else torch.addmm(b, a, w)
        num += float((y - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5
