"""An xmoe :class:`~xmoe.moe.MoE` built from a Hugging Face sparse MoE block, sharing its tensors.

transformers 5 stores the routed experts fused and stacked: ``gate_up_proj [E, 2h, d]`` (gate
rows first, then up rows) and ``down_proj [E, d, h]``, applied as ``F.linear`` (``x @ W.T``).
xmoe's experts are ``w1 [E, d, h]`` (gate), ``w3 [E, d, h]`` (up) and ``w2 [E, h, d]``, applied
as ``x @ w``. So ``w1 = gate_up_proj[:, :h].transpose(1, 2)``, ``w3 = gate_up_proj[:, h:]
.transpose(1, 2)`` and ``w2 = down_proj.transpose(1, 2)``: *views* of the same storage, no copy.
The router weight, DeepSeek-V3's ``e_score_correction_bias`` and Qwen2-MoE's
``shared_expert_gate`` are the HF tensors themselves; the shared experts' weights are views of
the HF MLP's ``nn.Linear`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..moe import MoE
from ..moe.experts import Experts
from ..routing.scored import ScoredRouter


@dataclass(frozen=True)
class Family:
    """One supported HF sparse MoE block."""

    name: str  # "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"
    block: str  # class name of the HF sparse MoE block
    module: str  # transformers module that defines it
    model: str  # the causal-LM class (for messages)


FAMILIES = (
    Family("mixtral", "MixtralSparseMoeBlock", "mixtral", "MixtralForCausalLM"),
    Family("olmoe", "OlmoeSparseMoeBlock", "olmoe", "OlmoeForCausalLM"),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "qwen2_moe", "Qwen2MoeForCausalLM"),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "qwen3_moe", "Qwen3MoeForCausalLM"),
    Family("deepseek_v3", "DeepseekV3MoE", "deepseek_v3", "DeepseekV3ForCausalLM"),
)
SUPPORTED_MODELS = tuple(f.model for f in FAMILIES)


def block_family(module: nn.Module) -> Family | None:
    """The family whose sparse MoE block ``module`` is (by class, from its transformers module)."""
    cls = type(module)
    for fam in FAMILIES:
        if cls.__name__ == fam.block and cls.__module__.endswith(
            f".{fam.module}.modeling_{fam.module}"
        ):
            return fam
    return None


class HFMoE(MoE):
    """An xmoe MoE standing in for one HF sparse MoE block (same tensors, same outputs).

    ``forward(x: [B, T, d]) -> [B, T, d]`` like the HF block. ``native_options`` are the
    :class:`ScoredRouter` options that reproduce the HF routing; :meth:`use_routing` swaps in
    another rule on the same router weight and :meth:`restore_native` brings the HF rule back.

    Attributes:
        family: the :class:`Family` name.
        layer_index: position among the model's MoE blocks (0-based).
    """

    def __init__(
        self,
        family: str,
        layer_index: int,
        router: ScoredRouter,
        experts: Experts,
        shared_experts: Experts | None = None,
        shared_gate: nn.Linear | None = None,
    ) -> None:
        super().__init__(
            experts.d_model,
            experts.num_experts,
            experts.d_expert,
            router=router,
            experts=experts,
            shared_experts=shared_experts,
        )
        self.shared_gate = shared_gate
        self.family = family
        self.layer_index = layer_index
        self.native_options = router.options()
        if router.has_bias:  # kept here too, so any router swap can restore it
            self.register_buffer("native_selection_bias", router.selection_bias, persistent=False)

    def use_routing(self, **changes) -> ScoredRouter:
        """Replace the router by one with the native options updated by ``changes`` (e.g.
        ``selection="threshold", threshold=0.8``); the weight and bias stay the same tensors."""
        options = {**self.native_options, **changes}
        with torch.device("meta"):  # the weight and bias are replaced by the shared ones below
            router = ScoredRouter(self.d_model, self.num_experts, **options)
        router.weight = self.router.weight
        if router.has_bias:  # the native bias, or a new zero one (loss-free balancing)
            native = getattr(self, "native_selection_bias", None)
            zeros = lambda: router.weight.new_zeros(self.num_experts, dtype=torch.float32)
            router.selection_bias = native if native is not None else zeros()
        router.train(self.training)
        self.router = router
        return router

    def restore_native(self) -> None:
        """Back to the HF block's own routing rule."""
        self.use_routing()

    def extra_repr(self) -> str:
        return f"family={self.family!r}, layer_index={self.layer_index}, " + super().extra_repr()


def moe_blocks(model: nn.Module) -> list[HFMoE]:
    """The model's :class:`HFMoE` blocks, in layer order."""
    return [m for m in model.modules() if isinstance(m, HFMoE)]


def require_blocks(model: nn.Module) -> list[HFMoE]:
    """:func:`moe_blocks`, or ``ValueError`` when the model has none (not patched yet)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("model has no xmoe MoE blocks: call xmoe.hf.patch(model) first")
    return blocks


def _param(t: Tensor, share: bool) -> nn.Parameter:
    """A parameter that is a view of ``t``'s storage (``share``) or a contiguous copy."""
    data = t.detach() if share else t.detach().contiguous().clone()
    return nn.Parameter(data, requires_grad=t.requires_grad)


def _activation(act_fn: nn.Module, hidden_act: str | None):
    """xmoe activation for the HF experts' ``act_fn`` (always gated: gate * up)."""
    name = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}.get(hidden_act or "")
    return name if name is not None else act_fn


def fused_experts(
    hf_experts: nn.Module, hidden_act: str | None, backend: str, share: bool = True
) -> Experts:
    """xmoe :class:`Experts` whose weights are views of HF's ``gate_up_proj`` / ``down_proj``
    (``share=False``: contiguous copies in xmoe's layout)."""
    gate_up, down = hf_experts.gate_up_proj, hf_experts.down_proj
    num_experts, two_h, d_model = gate_up.shape
    h = two_h // 2
    if tuple(down.shape) != (num_experts, d_model, h):
        raise ValueError(
            f"expected down_proj of shape {(num_experts, d_model, h)} next to gate_up_proj "
            f"{tuple(gate_up.shape)}, got {tuple(down.shape)}"
        )
    act = _activation(hf_experts.act_fn, hidden_act)
    with torch.device("meta"):
        experts = Experts(num_experts, d_model, h, act, bias=False, backend=backend, glu=True)
    experts.w1 = _param(gate_up[:, :h].transpose(1, 2), share)
    experts.w3 = _param(gate_up[:, h:].transpose(1, 2), share)
    experts.w2 = _param(down.transpose(1, 2), share)
    return experts


def mlp_experts(
    mlp: nn.Module, hidden_act: str | None, backend: str, share: bool = True
) -> Experts:
    """One xmoe expert whose weights are views of an HF gated MLP (gate/up/down ``nn.Linear``)."""
    g, u, dn = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    h, d_model = g.shape
    act = _activation(mlp.act_fn, hidden_act)
    with torch.device("meta"):
        experts = Experts(1, d_model, h, act, bias=False, backend=backend, glu=True)
    experts.w1 = _param(g.t().unsqueeze(0), share)
    experts.w3 = _param(u.t().unsqueeze(0), share)
    experts.w2 = _param(dn.t().unsqueeze(0), share)
    return experts


def native_router(family: str, gate: nn.Module) -> ScoredRouter:
    """A :class:`ScoredRouter` that routes exactly like the HF router ``gate``; same tensors."""
    num_experts, d_model = gate.weight.shape
    options: dict = {"score": "softmax", "selection": "topk", "k": int(gate.top_k)}
    if family == "mixtral":
        options["normalize"] = True
    elif family in ("olmoe", "qwen2_moe", "qwen3_moe"):
        options["normalize"] = bool(gate.norm_topk_prob)
    else:  # deepseek_v3
        options.update(
            score="sigmoid",
            normalize=bool(gate.norm_topk_prob),
            scaling=float(gate.routed_scaling_factor),
            num_groups=int(gate.num_group),
            topk_groups=int(gate.topk_group),
            selection_bias=True,
        )
    with torch.device("meta"):
        router = ScoredRouter(d_model, num_experts, **options)
    router.weight = gate.weight
    if family == "deepseek_v3":
        router.selection_bias = gate.e_score_correction_bias
    return router


def build_moe(
    family: str, block: nn.Module, layer_index: int, backend: str = "auto", share: bool = True
) -> HFMoE:
    """The :class:`HFMoE` equal to HF sparse MoE ``block`` of ``family``, sharing its tensors
    (``share=False``: the expert weights are copied into xmoe's contiguous layout)."""
    hidden_act = getattr(getattr(block, "config", None), "hidden_act", None)
    if hidden_act is None:
        hidden_act = getattr(block.experts, "config", None)
        hidden_act = getattr(hidden_act, "hidden_act", None)
    experts = fused_experts(block.experts, hidden_act, backend, share)
    shared, shared_gate = None, None
    if family == "qwen2_moe":
        shared = mlp_experts(block.shared_expert, hidden_act, backend, share)
        shared_gate = block.shared_expert_gate
    elif family == "deepseek_v3":
        shared = mlp_experts(block.shared_experts, hidden_act, backend, share)
    router = native_router(family, block.gate)
    moe = HFMoE(family, layer_index, router, experts, shared, shared_gate)
    moe.train(block.training)
    return moe
