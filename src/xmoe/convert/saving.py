"""Save and load converted models: safetensors weights, the HF config and the manifest.

A converted model directory holds ``config.json`` (the base HF config), tokenizer files,
``model.safetensors`` (all weights, converted FFNs included; no pickle) and
``xmoe_convert.json`` (the conversion manifest, format ``xmoe-convert/1``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .._io import atomic_write
from .adapters import ADAPTERS_BY_NAME, find_ffns, install_ffn
from .ffn import ConvertedFFN

MANIFEST = "xmoe_convert.json"
WEIGHTS = "model.safetensors"
FORMAT = "xmoe-convert/1"


def save_converted(model: nn.Module, out_dir: str | Path, manifest: dict, tokenizer=None) -> Path:
    """Write ``config.json`` (the base HF config), tokenizer files, ``model.safetensors`` (all
    weights, converted FFNs included) and ``xmoe_convert.json`` (the manifest). No pickle."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / WEIGHTS))
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


def load_converted(path: str | Path, with_tokenizer: bool = True):
    """Rebuild a converted model from ``path``: the HF class from the saved config, its FFNs
    replaced by empty :class:`ConvertedFFN` of the manifest's shapes, then the saved weights
    (strict). Returns ``(model, tokenizer or None, manifest)``; the model is in eval mode."""
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{str(path)!r} is not a converted model directory (no {MANIFEST})")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    cls = getattr(transformers, manifest["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{mpath}: model_class {manifest['model_class']!r} is not a transformers model"
        )
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = cls(hf_config)
    sites = find_ffns(model)
    layers = manifest["layers"]
    if len(sites) != len(layers) or sites[0].adapter is not ADAPTERS_BY_NAME[manifest["adapter"]]:
        raise ValueError(
            f"{mpath}: the manifest's FFNs do not match the model built from config.json"
        )
    cfg = manifest["config"]
    for site, info in zip(sites, layers, strict=True):
        dense = site.adapter.extract(site.owner)
        ffn = ConvertedFFN(
            info["d_model"],
            info["d_ff"],
            cfg["num_experts"],
            dense.act,
            gated=info["gated"],
            bias=info["bias"],
            threshold=cfg["threshold"],
            mode=cfg["router"],
            backend=cfg["backend"],
            router_score="sigmoid" if cfg.get("router_target") == "select" else "softmax",
        )
        install_ffn(model, site, ffn)
    load_model(model, str(path / WEIGHTS), strict=True)
    thresholds = manifest.get("layer_thresholds")
    if thresholds is not None:
        ffns = [m for m in model.modules() if isinstance(m, ConvertedFFN)]
        if len(thresholds) != len(ffns):
            raise ValueError(
                f"{mpath}: layer_thresholds has {len(thresholds)} values for {len(ffns)} FFNs"
            )
        for f, t in zip(ffns, thresholds, strict=True):
            f.set_threshold(t)
    model.eval()
    tokenizer = None
    if with_tokenizer and (path / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, manifest


def as_sentence_transformer(model: nn.Module, base_path: str | Path, device: str = "cpu"):
    """A ``SentenceTransformer`` pipeline loaded from ``base_path`` (e.g. the installed MiniLM:
    its pooling and normalisation modules) whose transformer is the converted ``model``."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(base_path), device=device)
    first = st[0]
    # sentence-transformers >= 5 keeps the HF model in ``.model`` (``auto_model`` is a read-only
    # alias); older versions store it in ``auto_model``.
    if isinstance(getattr(type(first), "auto_model", None), property):
        first.model = model.to(device)
    else:
        first.auto_model = model.to(device)
    if first.auto_model is not model:
        raise RuntimeError("could not install the converted model into the SentenceTransformer")
    return st
