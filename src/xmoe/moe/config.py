"""Typed settings of one MoE layer (:class:`MoEConfig`) and of its optional recipes.

``MoE.from_config(cfg, d_model)`` builds the layer. The training config (``model.moe`` in the
YAML) is this dataclass; ``local_search`` and ``evo`` are optional sub-configs (None = off; an
empty mapping ``{}`` in an old config also means off).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LocalSearchConfig:
    """COMET+ permutation local search around the router: the options of
    :class:`xmoe.routing.local_search.PermutationLocalSearch` (checked there, at build)."""

    search_fraction: float = 0.1  # fraction of training spent searching, in (0, 1]
    tau_start: float = 1.0  # Sinkhorn temperature at step 0
    tau_end: float = 0.05  # temperature at the end of the search, in (0, tau_start]
    sinkhorn_iters: int = 20
    prune_threshold: float = 1e-3  # P entries at or below it are not expanded into pairs
    init: str = "identity"  # or "uniform"
    init_scale: float = 1.0
    noise: bool = True  # Gumbel noise on the permutation logits in training


@dataclass
class EvoConfig:
    """EvoMoE recipe: each MoE layer starts as one expert of width d_expert; at
    ``diversify_step`` it is split into ``num_experts`` masked copies and training continues
    with the configured router (typically ``dts``)."""

    diversify_step: int  # in [1, train.steps)
    mask_ratio: float = 0.5  # fraction of each copy's hidden units masked at the split
    noise_std: float = 0.0  # Gaussian noise added to the copies


@dataclass
class MoEConfig:
    """MoE FFN settings. Defaults: XMoE's small experts (d_ff / 8) with threshold 0.9."""

    num_experts: int = 16  # many narrow experts (XMoE); 16 x d_ff/8 = 2x the dense params
    d_expert: int = 64  # expert width; XMoE uses d_ff / 8
    router: str = "threshold"
    router_options: dict = field(default_factory=dict)  # e.g. {"threshold": 0.9} or {"k": 2}
    activation: str = "gelu"
    bias: bool = True
    # None: the router's default (dropless, except switch: 1.25); "dropless" forces dropless.
    capacity_factor: float | str | None = None
    eval_capacity_factor: float | str | None = None  # None = dropless eval (batch-invariant)
    backend: str = "auto"
    # Always-on experts beside the routed ones (DeepSeek-V3, Qwen2-MoE); 0 = none.
    shared_experts: int = 0
    d_shared: int | None = None  # width of each shared expert; None = d_expert
    shared_gate: bool = False  # scale the shared output by a learned sigmoid gate (Qwen2-MoE)
    # Coefficients of the router losses added to the LM loss, by name. Each router brings its
    # paper's defaults (e.g. load_balance 0.01, z_loss 0.001); entries here override them.
    loss_coefs: dict = field(default_factory=dict)
    local_search: LocalSearchConfig | None = None  # COMET+ permutation local search; None = off
    evo: EvoConfig | None = None  # EvoMoE recipe (see EvoConfig); None = off
