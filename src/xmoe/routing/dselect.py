"""DSelect-k gate (Hazimeh et al., NeurIPS 2021), per-example version.

DSelect-k writes the choice of one expert out of E as ``m = ceil(log2 E)`` binary variables and
relaxes each bit with the smooth-step ``S_gamma``. A *single-expert selector* with logits
``z in R^m`` puts weight

    r(z)_c = prod_b ( S(z_b) if bit b of c is 1 else 1 - S(z_b) ),    c = 0 .. 2^m - 1

on code c; r sums to 1 over the 2^m codes and is one-hot once every ``S(z_b)`` is exactly 0 or 1.
k selectors are mixed by a softmax: ``w = sum_i softmax(alpha)_i r(z_i)``, so at most k experts
have a nonzero weight once the selectors are binary, while the gate stays differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_int
from .base import Router, Routing
from .smooth_step import (
    check_gamma,
    check_init_scale,
    entropy_rows,
    fp32_linears,
    num_code_bits,
    routing_from_dense,
    smooth_step,
    token_mean,
)


def selector_weights(s: Tensor) -> Tensor:
    """Single-expert selector weights from smooth-step values.

    Args:
        s: ``[..., m]`` values ``S(z_b)`` in [0, 1].
    Returns:
        ``[..., 2^m]``: entry c is ``prod_b (s_b if bit b of c is 1 else 1 - s_b)``, with bit b
        the ``2^b`` bit of c. Built one bit at a time (most significant first) with plain
        products, so a bit that is exactly 0 or 1 gives exact zeros.
    """
    r = s.new_ones(*s.shape[:-1], 1)
    for b in range(s.shape[-1] - 1, -1, -1):
        sb = s[..., b : b + 1]
        # appending bit b as the new least significant bit: code = 2 * code + bit
        r = torch.stack([r * (1.0 - sb), r * sb], dim=-1).flatten(-2)
    return r


class DSelectKRouter(Router):
    """DSelect-k, example-conditioned: ``z = x Wz^T`` (``[N, k, m]``), ``alpha = x Wa^T``
    (``[N, k]``), weight of expert e ``w_e = sum_i softmax(alpha)_i r(z_i)_e`` for e < E.

    The pairs are the entries with ``w_e > 0`` exactly (early in training, while the selectors are
    fractional, that can be every expert; the entropy loss drives them to binary, and then each
    token keeps at most k experts). ``rank`` orders a token's kept experts by descending weight;
    ``score`` is the detached weight. When E is not a power of two the codes ``c >= E`` name no
    expert: their weight is simply lost (the kept weights sum to less than 1) and the
    ``nonexistent_mass`` loss pushes the selectors off them. E = 1 uses m = 0 bits: every selector
    is the constant 1 on expert 0.

    Args:
        d_model: input feature size.
        num_experts: E >= 1.
        k: number of single-expert selectors, the maximum number of experts per token once the
            gate is binary, in [1, E]. Default 2 (the top-2 budget of the other routers here).
        gamma: width of the smooth-step's fractional region, > 0. Default 1.0, the default of
            the authors' released gate (the paper tunes gamma per task); only the ratio of z to
            gamma matters.
        init_scale: half-width ``a`` of the uniform init ``U(-a, a)`` of ``Wz``. Default
            ``gamma / 100``, the z init of the authors' released gate (the paper's requirement is
            that z starts in the fractional region; I took the value from their defaults, not
            from the paper text): every z starts well inside ``(-gamma/2, gamma/2)``, so all bits
            are fractional (nonzero gradients, every expert reachable) and each selector starts
            close to uniform. No bias (the released gate has one, with the same init). With
            unit-variance inputs ``z`` has std ``a * sqrt(d_model / 3)``: about 0.065 gamma at
            d_model = 128, 0.37 gamma at 4096 (for very wide models a smaller value keeps the
            start fractional).
        alpha_init_scale: half-width of the uniform init of ``Wa``. Default 0.05, the uniform
            initialiser of the authors' released gate (small: the selector mixture starts near
            uniform). *Uncertain*: I could not confirm this value in the paper text.
        check_finite: raise ``ValueError`` when z or alpha holds NaN or inf (one host sync).

    Losses (unweighted, ``Routing.losses``):
        ``entropy``: the paper's regulariser ``sum_i H(r(z_i))`` (entropy of each selector over
            its 2^m codes, summed over selectors), mean over tokens. 0 iff every selector is
            one-hot; minimising it pushes the bits to exactly 0/1.
        ``nonexistent_mass``: ``sum_i sum_{c >= E} r(z_i)_c``, mean over tokens; identically 0
            when E is a power of two. The paper's released gate uses ``sum_i 1 / (reachable
            mass of selector i)`` instead, which is ``1 + nonexistent mass`` to first order; the
            linear form is used here because it stays finite when a selector saturates on a
            non-existent code.

    ``default_loss_coefs``: ``entropy`` 0.01 (not a paper value: the paper tunes it per task;
    0.01 on a per-token mean is what the released gate's default 1e-6 on a per-batch *sum* gives
    at ~10k tokens per batch), ``nonexistent_mass`` 1.0 (the released gate adds its penalty with
    no coefficient, on a per-batch sum, so this is weaker per token; it is a soft constraint).
    Neither value was tuned in this library.

    Extras: ``nonexistent_weight`` (mean over tokens of the mixture weight on codes >= E, i.e.
    ``1 - sum_e w_e``; exactly 0 when E is a power of two) and ``binary_fraction`` (fraction of
    the ``S(z)`` values that are exactly 0 or 1).
    """

    default_loss_coefs = {"entropy": 0.01, "nonexistent_mass": 1.0}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        gamma: float = 1.0,
        init_scale: float | None = None,
        alpha_init_scale: float = 0.05,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        check_int("k", k, 1, num_experts)
        self.gamma = check_gamma(gamma)
        self.init_scale = check_init_scale("init_scale", init_scale, self.gamma / 100)
        self.alpha_init_scale = check_init_scale("alpha_init_scale", alpha_init_scale, 0.05)
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.num_bits = num_code_bits(num_experts)
        self.num_codes = 2**self.num_bits
        self.check_finite = bool(check_finite)
        self.z_weight = nn.Parameter(torch.empty(k * self.num_bits, d_model))
        self.alpha_weight = nn.Parameter(torch.empty(k, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.z_weight, -self.init_scale, self.init_scale)
        nn.init.uniform_(self.alpha_weight, -self.alpha_init_scale, self.alpha_init_scale)

    def gate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The dense gate, fp32.

        Args:
            x: ``[N, d_model]``.
        Returns:
            ``(codes [N, 2^m], selectors [N, k, 2^m], mix [N, k], s [N, k, m])``: the mixture
            weight of every code (the expert weights are ``codes[:, :E]``), each selector's
            weights, ``softmax(alpha)`` and ``S(z)``.
        """
        n = x.shape[0]
        z, alpha = fp32_linears(x, self.z_weight, self.alpha_weight, check_finite=self.check_finite)
        s = smooth_step(z.view(n, self.k, self.num_bits), self.gamma)
        selectors = selector_weights(s)  # [N, k, 2^m]
        mix = alpha.softmax(dim=-1)  # [N, k]
        # elementwise + sum (not a matmul): exact zeros stay exact, no TF32
        codes = (mix.unsqueeze(-1) * selectors).sum(dim=1)  # [N, 2^m]
        return codes, selectors, mix, s

    def forward(self, x: Tensor, **kwargs) -> Routing:
        codes, selectors, _, s = self.gate(x)
        e = self.num_experts
        routing = routing_from_dense(codes[:, :e])
        lost = selectors[..., e:].sum(dim=(-1, -2))  # [N], per-selector mass on codes >= E
        routing.losses.update(
            {
                "entropy": token_mean(entropy_rows(selectors).sum(dim=-1)),
                "nonexistent_mass": token_mean(lost),
            }
        )
        with torch.no_grad():
            routing.extras["nonexistent_weight"] = token_mean(codes[:, e:].sum(dim=-1))
            binary = (s == 0) | (s == 1)
            routing.extras["binary_fraction"] = (
                binary.float().mean() if binary.numel() else codes.new_ones(())
            )
        return routing

    def extra_repr(self) -> str:
        return f"k={self.k}, gamma={self.gamma}, num_bits={self.num_bits}"
