"""ReLU-fication: swap a dense model's FFN activation for ReLU before it is split.

MoEfication's premise, that a token's FFN output lives in a few neuron groups, holds for ReLU
models: most ReLU activations are exactly zero. A GELU model's negative activations are small
but not zero and spread over every group. Swapping GELU for ReLU changes the function, so the
swap is followed by a recovery step: the least-squares refit of each FFN's second layer to the
GELU model's outputs (:func:`~.refit.refit_second_layers` in dense mode) and, optionally, a
distillation (:func:`~.finetune.distill`).

The model config's activation name is changed too, so a saved conversion reloads with ReLU.
"""

from __future__ import annotations

from torch import nn

from .adapters import find_ffns

# adapter name -> (attribute of the FFN owner holding the activation, config attribute)
ACTIVATION_SLOTS = {
    "bert": ("intermediate.intermediate_act_fn", "hidden_act"),
    "gpt2": ("act", "activation_function"),
    "llama": ("act_fn", "hidden_act"),
}


def relufy(model: nn.Module) -> int:
    """Replace the activation of every FFN of the dense ``model`` by ``nn.ReLU`` in place and
    set the config's activation name to ``"relu"``. Returns the number of FFNs changed."""
    sites = find_ffns(model)
    adapter = sites[0].adapter.name
    if adapter not in ACTIVATION_SLOTS:
        raise ValueError(f"relufy: no activation slot known for adapter {adapter!r}")
    attr, cfg_attr = ACTIVATION_SLOTS[adapter]
    parent_path, _, name = attr.rpartition(".")
    for s in sites:
        parent = s.owner.get_submodule(parent_path) if parent_path else s.owner
        if not hasattr(parent, name):
            raise ValueError(f"relufy: {s.name!r} has no activation {attr!r}")
        setattr(parent, name, nn.ReLU())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        setattr(cfg, cfg_attr, "relu")
    return len(sites)
