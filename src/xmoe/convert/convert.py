"""Convert a Hugging Face model's dense FFNs into sliced experts with fitted threshold routers.

    model = AutoModel.from_pretrained(path)
    batches = calibration_batches(tokenizer, calibration_texts(), calib_tokens=16384)
    manifest = convert_model(model, ConvertConfig(num_experts=32), batches)
    set_threshold(model, 0.8)          # run time: fewer experts per token
    save_converted(model, out_dir, manifest, tokenizer)
    model, tokenizer, manifest = load_converted(out_dir)

Steps per FFN (all FFN inputs are captured from the *dense* model in one calibration pass):
1. read the dense weights through the adapter (:mod:`.adapters`);
2. split the neurons into E equal experts (:mod:`.split`);
3. fit the router: ``softmax(x Wrᵀ + br)`` trained with soft-target cross-entropy (= KL up to a
   constant) against each expert's true share of activation mass on the calibration tokens;
4. install the :class:`~.ffn.ConvertedFFN` in place of the dense FFN math.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import ADAPTERS_BY_NAME, find_ffns, install_ffn
from .ffn import MODES, ConvertedFFN, check_threshold
from .split import SPLITS, split_neurons

MANIFEST = "xmoe_convert.json"
WEIGHTS = "model.safetensors"
FORMAT = "xmoe-convert/1"
ROUTERS = ("learned", "oracle")


@dataclass
class ConvertConfig:
    """Conversion settings (``xmoe convert`` flags).

    Attributes:
        num_experts: E experts per FFN; must divide d_ff.
        split: neuron grouping: ``coact`` (default), ``params`` or ``random``. On MiniLM,
            ``params`` and ``coact`` were within ~0.01 cosine of each other, and both beat
            ``random`` (docs/dense-to-sparse.md).
        router: mode saved as the default, ``learned`` or ``oracle`` (``oracle`` skips fitting).
        threshold: default keep threshold saved with the model (changeable at run time).
        calib_tokens: calibration tokens (non-padding) used for the split and the router fit.
        router_steps: Adam steps of each router fit (a few hundred converge on CPU in seconds).
        router_lr: Adam learning rate of the router fit.
        router_batch: tokens per router-fit step.
        seed: seeds the split and the router-fit minibatches.
        backend: :class:`xmoe.Experts` compute backend.
    """

    num_experts: int = 32
    split: str = "coact"
    router: str = "learned"
    threshold: float = 0.9
    calib_tokens: int = 16384
    router_steps: int = 300
    router_lr: float = 1e-2
    router_batch: int = 4096
    seed: int = 0
    backend: str = "auto"

    def validate(self) -> None:
        if not (isinstance(self.num_experts, int) and self.num_experts >= 1):
            raise ValueError(
                f"num_experts (--experts) must be an integer >= 1, got {self.num_experts!r}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"split (--split) must be one of {SPLITS}, got {self.split!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router (--router) must be one of {ROUTERS}, got {self.router!r}")
        check_threshold(self.threshold)
        for name in ("calib_tokens", "router_steps", "router_batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be an integer >= 1, got {v!r}")
        if not (self.router_lr > 0):
            raise ValueError(f"router_lr must be > 0, got {self.router_lr!r}")


# ---------------------------------------------------------------------------------- calibration


def calibration_batches(
    tokenizer, texts: list[str], calib_tokens: int, max_length: int = 128, batch_size: int = 32
) -> list[dict[str, Tensor]]:
    """Take ``texts`` in order until they hold ``calib_tokens`` tokens (each truncated to
    ``max_length``), then batch them grouped by length so that batches carry little padding."""
    chosen, total = [], 0
    for text in texts:
        n = len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        chosen.append((n, text))
        total += n
        if total >= calib_tokens:
            break
    if total < calib_tokens:
        raise ValueError(f"calibration text has only {total} tokens; asked for {calib_tokens}")
    chosen.sort(key=lambda c: c[0])
    batches = []
    for i in range(0, len(chosen), batch_size):
        enc = tokenizer(
            [t for _, t in chosen[i : i + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


@torch.no_grad()
def capture_ffn_inputs(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    max_tokens: int | None = None,
    progress=False,
) -> list[Tensor]:
    """Run ``model`` on ``batches`` and return each FFN's input rows at non-padding positions:
    one ``[N, d_model]`` fp32 tensor per FFN (in :func:`find_ffns` order)."""
    from tqdm.auto import tqdm

    sites = find_ffns(model)
    store: list[list[Tensor]] = [[] for _ in sites]
    mask_now: list[Tensor] = []

    def hook(i):
        def fn(_module, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if mask_now:
                rows = rows[mask_now[0].reshape(-1).bool()]
            store[i].append(rows.detach().float())

        return fn

    handles = [
        s.adapter.entry(s.owner).register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            mask_now[:] = [batch["attention_mask"]] if "attention_mask" in batch else []
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = [torch.cat(rows, 0) for rows in store]
    return [x[:max_tokens] for x in out] if max_tokens else out


# ---------------------------------------------------------------------------------- conversion


def convert_model(
    model: nn.Module,
    config: ConvertConfig,
    batches: list[dict[str, Tensor]] | None = None,
    inputs: list[Tensor] | None = None,
    progress: bool = False,
) -> dict:
    """Replace every FFN of ``model`` in place; return the conversion manifest (JSON-able).

    Give either calibration ``batches`` (model inputs) or precomputed ``inputs`` (each FFN's
    calibration input rows, from :func:`capture_ffn_inputs` on the dense model).
    """
    from tqdm.auto import tqdm

    config.validate()
    sites = find_ffns(model)
    for s in sites:
        d_ff = s.adapter.extract(s.owner).d_ff
        if d_ff % config.num_experts:
            raise ValueError(
                f"num_experts (--experts) = {config.num_experts} does not divide the FFN width "
                f"d_ff={d_ff} of {s.name!r}; choose a divisor of {d_ff}"
            )
    if inputs is None:
        if batches is None:
            raise ValueError("convert_model needs calibration batches or inputs")
        inputs = capture_ffn_inputs(model, batches, config.calib_tokens, progress)
    if len(inputs) != len(sites):
        raise ValueError(f"got calibration inputs for {len(inputs)} FFNs, model has {len(sites)}")
    fit = config.router == "learned"
    bar = tqdm(
        total=len(sites) * (config.router_steps if fit else 1),
        desc="split+router fit",
        disable=not progress,
        leave=False,
    )
    layers = []
    for i, (site, x) in enumerate(zip(sites, inputs, strict=True)):
        x = x[: config.calib_tokens]
        dense = site.adapter.extract(site.owner)
        with torch.no_grad():
            acts = dense.neuron_acts(x) if config.split == "coact" else None
            groups = split_neurons(config.split, dense, config.num_experts, acts, config.seed + i)
        del acts
        ffn = ConvertedFFN.from_dense(
            dense, groups, backend=config.backend, threshold=config.threshold, mode=config.router
        )
        info = {
            "name": site.name,
            "d_model": dense.d_model,
            "d_ff": dense.d_ff,
            "gated": dense.gated,
            "bias": dense.b1 is not None,
            "calib_tokens": int(x.shape[0]),
        }
        if fit:
            info.update(fit_router(ffn, x, config, seed=config.seed + i, bar=bar))
        else:
            bar.update(1)
        install_ffn(model, site, ffn)
        layers.append(info)
    bar.close()
    return {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "adapter": sites[0].adapter.name,
        "config": asdict(config),
        "layers": layers,
        "versions": _versions(),
    }


def fit_router(
    ffn: ConvertedFFN, x: Tensor, config: ConvertConfig, seed: int = 0, bar=None
) -> dict:
    """Fit ``ffn.router`` to the true expert shares on calibration inputs ``x: [N, d_model]``.

    Loss: soft-target cross-entropy ``-sum_e q_e log softmax(x Wrᵀ + br)_e`` with ``q`` the
    oracle share (:meth:`ConvertedFFN.oracle_share`); minimising it minimises KL(q || p).
    Returns the final KL and the experts per token that t = 0.9 would keep (oracle vs learned).
    """
    with torch.no_grad():
        q = torch.cat([ffn.oracle_share(c) for c in x.split(4096)])
    router = ffn.router
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(q.mean(0).clamp_min(1e-8).log())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=config.router_lr)
    n = x.shape[0]
    for _ in range(config.router_steps):
        idx = torch.randint(n, (min(config.router_batch, n),), generator=gen)
        logp = router(x[idx]).log_softmax(-1)
        loss = -(q[idx] * logp).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        logp = router(x).log_softmax(-1)
        kl = (q * (q.clamp_min(1e-12).log() - logp)).sum(-1).mean()
    return {"router_kl": round(float(kl), 5)}


# ---------------------------------------------------------------------------------- run-time knobs


def converted_ffns(model: nn.Module) -> list[ConvertedFFN]:
    return [m for m in model.modules() if isinstance(m, ConvertedFFN)]


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Set the keep threshold t of every converted FFN."""
    check_threshold(threshold)
    for f in _require_converted(model):
        f.set_threshold(threshold)


def set_mode(model: nn.Module, mode: str) -> None:
    """``learned`` / ``oracle`` routing, or ``dense`` (all neurons, plain GEMMs) everywhere."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for f in _require_converted(model):
        f.set_mode(mode)


def _require_converted(model: nn.Module) -> list[ConvertedFFN]:
    ffns = converted_ffns(model)
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no converted FFNs")
    return ffns


# ---------------------------------------------------------------------------------- save / load


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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
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
        )
        install_ffn(model, site, ffn)
    load_model(model, str(path / WEIGHTS), strict=True)
    model.eval()
    tokenizer = None
    if with_tokenizer and (path / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, manifest


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {
        "xmoe": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


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
