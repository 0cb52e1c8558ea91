"""Where a Hugging Face model keeps its FFNs: a small adapter table.

Each adapter recognises the module that owns one FFN, reads its dense weights, and installs a
:class:`~xmoe.convert.ffn.ConvertedFFN` in its place while leaving the rest of the block alone:

==========  ===============================================  =======================================
adapter     FFN owner (module with ...)                      replaced
==========  ===============================================  =======================================
``bert``    ``intermediate.dense`` + ``output.dense``        ``intermediate`` → ConvertedFFN,
            (BERT, RoBERTa, MiniLM, ...)                     ``output.dense`` → Identity (dropout,
                                                             LayerNorm and residual stay)
``gpt2``    ``c_fc`` + ``c_proj`` (``Conv1D``: weight is     ``c_fc`` → ConvertedFFN, ``act`` and
            ``[in, out]``)                                   ``c_proj`` → Identity (dropout stays)
``llama``   ``gate_proj`` + ``up_proj`` + ``down_proj``      the whole MLP → ConvertedFFN
==========  ===============================================  =======================================

An owner is matched by structure, not by class name, so close relatives (RoBERTa, Mistral, ...)
work too. No match anywhere raises a ``ValueError`` naming the model class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .ffn import ConvertedFFN, DenseFFN


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    """HF's GPT-2 ``Conv1D``: a linear layer with ``weight [in, out]`` (``nf`` = out features)."""
    return (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    )


def _bias(m):
    return None if m.bias is None else m.bias.detach()


@dataclass(frozen=True)
class Adapter:
    name: str
    description: str
    match: Callable[[nn.Module], bool]
    extract: Callable[[nn.Module], DenseFFN]
    install: Callable[[nn.Module, ConvertedFFN], None]
    entry: Callable[[nn.Module], nn.Module]  # the submodule whose first input is the FFN input


# ------------------------------------------------------------------------------------ BERT


def _bert_match(m) -> bool:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (
        _is_linear(getattr(inter, "dense", None))
        and hasattr(inter, "intermediate_act_fn")
        and _is_linear(getattr(out, "dense", None))
    )


def _bert_extract(m) -> DenseFFN:
    d1, d2 = m.intermediate.dense, m.output.dense
    return DenseFFN(
        d1.weight.detach(),
        _bias(d1),
        d2.weight.detach(),
        _bias(d2),
        m.intermediate.intermediate_act_fn,
    )


def _bert_install(m, ffn: ConvertedFFN) -> None:
    m.intermediate = ffn
    m.output.dense = nn.Identity()


# ------------------------------------------------------------------------------------ GPT-2


def _gpt2_match(m) -> bool:
    return (
        _is_conv1d(getattr(m, "c_fc", None))
        and _is_conv1d(getattr(m, "c_proj", None))
        and (hasattr(m, "act"))
    )


def _gpt2_extract(m) -> DenseFFN:
    c1, c2 = m.c_fc, m.c_proj  # Conv1D weights are [in, out]: transpose to nn.Linear layout
    return DenseFFN(c1.weight.detach().T, _bias(c1), c2.weight.detach().T, _bias(c2), m.act)


def _gpt2_install(m, ffn: ConvertedFFN) -> None:
    m.c_fc = ffn
    m.act = nn.Identity()
    m.c_proj = nn.Identity()


# ------------------------------------------------------------------------------------ Llama


def _llama_match(m) -> bool:
    return all(_is_linear(getattr(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj")) and (
        hasattr(m, "act_fn")
    )


def _llama_extract(m) -> DenseFFN:
    g, u, d = m.gate_proj, m.up_proj, m.down_proj
    return DenseFFN(
        g.weight.detach(),
        _bias(g),
        d.weight.detach(),
        _bias(d),
        m.act_fn,
        w3=u.weight.detach(),
        b3=_bias(u),
    )


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "bert",
        "intermediate.dense + output.dense",
        _bert_match,
        _bert_extract,
        _bert_install,
        lambda m: m.intermediate,
    ),
    Adapter(
        "gpt2",
        "mlp.c_fc + mlp.c_proj (Conv1D)",
        _gpt2_match,
        _gpt2_extract,
        _gpt2_install,
        lambda m: m,
    ),
    Adapter(
        "llama",
        "mlp.gate_proj + up_proj + down_proj",
        _llama_match,
        _llama_extract,
        None,  # replaced by name in the parent: see install_ffn
        lambda m: m,
    ),
)
ADAPTERS_BY_NAME = {a.name: a for a in ADAPTERS}


@dataclass
class FFNSite:
    """One FFN of the model: ``name`` is the owner's qualified module name."""

    name: str
    owner: nn.Module
    adapter: Adapter


def find_ffns(model: nn.Module) -> list[FFNSite]:
    """Every FFN owner in ``model``, in module order. Raises ``ValueError`` when none matches."""
    sites = []
    for name, m in model.named_modules():
        for a in ADAPTERS:
            if a.match(m):
                sites.append(FFNSite(name, m, a))
                break
    if not sites:
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        known = "; ".join(f"{a.name}: {a.description}" for a in ADAPTERS)
        raise ValueError(
            f"unsupported architecture: no FFN of {type(model).__name__} "
            f"(model_type={model_type!r}) matches a known adapter ({known})"
        )
    kinds = {s.adapter.name for s in sites}
    if len(kinds) > 1:
        raise ValueError(f"{type(model).__name__} mixes FFN kinds {sorted(kinds)}; not supported")
    return sites


def install_ffn(model: nn.Module, site: FFNSite, ffn: ConvertedFFN) -> None:
    """Put ``ffn`` in place of ``site``'s dense FFN math."""
    if site.adapter.install is not None:
        site.adapter.install(site.owner, ffn)
        return
    parent_name, _, child = site.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, ffn)
    site.owner = ffn
