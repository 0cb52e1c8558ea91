"""Noisy top-k gating (Shazeer et al., 2017) with its importance and load losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .base import LinearRouter, Routing
from .losses import cv_squared, z_loss


class NoisyTopKRouter(LinearRouter):
    """Shazeer's sparsely-gated MoE gate.

    ``H = x W_g + eps * softplus(x W_noise)`` with ``eps ~ N(0, 1)`` in training only;
    ``G = softmax(KeepTopK(H, k))``: the weights are renormalised over the k kept logits.

    Losses (unweighted; default coefficients 0.1 each, the paper's w_importance / w_load):
    - ``importance``: CV^2 of ``sum_x G_e(x)``;
    - ``load``: CV^2 of the smooth load estimate ``sum_x P(x, e)``, where P is the probability
      (normal CDF) that e stays in the top k under a fresh draw of its own noise.

    Args:
        k: experts per token, in [1, E]. Default 2.
        noise_epsilon: floor added to the noise std for stability. Default 1e-2.
    """

    default_loss_coefs = {"importance": 0.1, "load": 0.1}

    def __init__(
        self, d_model: int, num_experts: int, *, k: int = 2, noise_epsilon: float = 1e-2, **kwargs
    ) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        check_int("k", k, 1, num_experts)
        self.k = k
        self.noise_epsilon = float(noise_epsilon)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))  # paper: zero init

    def forward(self, x: Tensor, **kwargs) -> Routing:
        clean = self.logits(x)
        n, e = clean.shape
        noisy, noise_std = clean, None
        if self.training:
            with torch.autocast(device_type=x.device.type, enabled=False):
                noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
            noise_std = noise_std + self.noise_epsilon
            noisy = clean + torch.randn_like(clean) * noise_std
        top = noisy.topk(min(self.k + 1, e), dim=-1)
        gates = top.values[:, : self.k].softmax(dim=-1)  # [N, k]
        experts = top.indices[:, : self.k]
        routing = Routing(
            token_idx=torch.arange(n, device=x.device).repeat_interleave(self.k),
            expert_idx=experts.reshape(-1),
            weight=gates.reshape(-1),
            rank=torch.arange(self.k, device=x.device).repeat(n),
            score=gates.reshape(-1).detach(),
            num_tokens=n,
            num_experts=e,
        )
        importance = clean.new_zeros(e).index_add(0, routing.expert_idx, routing.weight)
        if noise_std is not None and self.k < e:
            load = self._smooth_load(clean, noisy, noise_std, top.values)
        else:
            load = torch.bincount(routing.expert_idx, minlength=e).to(clean.dtype)
        routing.losses.update(
            {
                "importance": cv_squared(importance),
                "load": cv_squared(load),
                "z_loss": z_loss(clean),
            }
        )
        return routing

    def _smooth_load(self, clean: Tensor, noisy: Tensor, std: Tensor, top_values: Tensor) -> Tensor:
        """``sum_x P(x, e)``: P(e stays in the top k) = Phi((clean - threshold) / std), where the
        threshold is the k-th largest *other* noisy logit."""
        kth = top_values[:, self.k - 1 : self.k]  # the k-th largest (used when e is outside)
        kth_plus_1 = top_values[:, self.k : self.k + 1]  # (k+1)-th (when e is inside the top k)
        inside = noisy > kth_plus_1
        normal = torch.distributions.Normal(0.0, 1.0)
        p_inside = normal.cdf((clean - kth_plus_1) / std)
        p_outside = normal.cdf((clean - kth) / std)
        return torch.where(inside, p_inside, p_outside).sum(dim=0)
