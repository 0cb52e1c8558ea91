"""Consolidated checkpoints of an expert-parallel model: gather on save, slice on load.

A checkpoint always holds the *unsharded* model (the same names and shapes a single process
saves), so it loads at any world size and EP size. Expert tensors (weights and their optimizer
moments) are gathered along the expert dimension over the EP group; replicated tensors are
taken from the local rank. Optimizer parameter ids line up because :class:`ExpertParallelMoE`
registers its parameters in the single-process order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ep_layer import ExpertParallelMoE
from .groups import ParallelContext
from .model import expert_parameters


def gather_experts(t: Tensor, layer: ExpertParallelMoE) -> Tensor:
    """Local slice ``[E/P, ...]`` → all experts ``[E, ...]`` (collective over the EP group)."""
    parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=layer.group)
    return torch.cat(parts, 0)


def slice_experts(t: Tensor, layer: ExpertParallelMoE) -> Tensor:
    """All experts ``[E, ...]`` → this rank's slice."""
    if t.shape[0] != layer.num_experts:
        raise ValueError(
            f"checkpoint expert tensor has {t.shape[0]} experts, the model {layer.num_experts}"
        )
    start = layer.expert_offset
    return t[start : start + layer.num_local_experts].clone()


def consolidated_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded model state (shared tensors such as tied embeddings listed once, under
    their first name in sorted order, as safetensors' ``save_model`` does). Collective."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name, p in module.experts.named_parameters():
                state[f"{prefix}.experts.{name}"] = gather_experts(p, module)
    shared: dict[object, list[str]] = {}
    for name, t in state.items():
        key = t.untyped_storage().data_ptr() if t.numel() else name
        shared.setdefault(key, []).append(name)
    for names in shared.values():
        for name in sorted(names)[1:]:
            del state[name]
    return {k: v.contiguous() for k, v in state.items()}


def _param_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, object]:
    """Optimizer state id → the expert-parallel layer holding that parameter (expert params)."""
    sharded = expert_parameters(model)
    ids: dict[int, object] = {}
    pid = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in sharded:
                ids[pid] = (sharded[p], p.shape)
            pid += 1
    return ids


def consolidated_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every expert parameter's per-element state (Adam
    moments) gathered to all experts. Collective over the EP groups."""
    sd = optimizer.state_dict()
    layers = _param_layers(model, optimizer)
    state = {}
    # Every rank gathers in the same order: sorted ids, not the state's insertion order
    # (a restored optimizer holds its state in the order the checkpoint listed it).
    for pid in sorted(sd["state"]):
        pstate = sd["state"][pid]
        layer = layers.get(pid)
        state[pid] = {
            key: gather_experts(pstate[key], layer[0])
            if layer is not None and torch.is_tensor(pstate[key]) and pstate[key].shape == layer[1]
            else pstate[key]
            for key in sorted(pstate)
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_tensors(
    tensors: dict[str, Tensor], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Tensor]:
    """Slice the consolidated optimizer tensors (``state.<pid>.<key>``, as the trainer's
    checkpoint stores them) to this rank's expert slices."""
    layers = _param_layers(model, optimizer)
    out = {}
    for name, value in tensors.items():
        parts = name.split(".", 2)
        layer = layers.get(int(parts[1])) if parts[0] == "state" else None
        if layer is not None and value.dim() > 0:
            value = slice_experts(value, layer[0])
        out[name] = value
    return out


def is_writer(ctx: ParallelContext | None) -> bool:
    return ctx is None or ctx.is_main
