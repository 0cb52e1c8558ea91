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

Calibration lives in :mod:`.calibrate`, saving and loading in :mod:`.saving`.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_positive, check_range
from .adapters import find_ffns, install_ffn
from .calibrate import capture_ffn_inputs
from .ffn import MODES, ConvertedFFN
from .router import check_threshold
from .saving import FORMAT
from .split import SPLITS, split_neurons

ROUTERS = ("learned", "oracle")
ROUTER_TARGETS = ("share", "select")


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
        router_target: what the learned router is fitted to. ``share``: softmax logits against
            the oracle's share of activation mass (soft-target cross-entropy). ``select``: one
            sigmoid per expert against whether the oracle keeps it at ``label_threshold``
            (binary cross-entropy; Deja Vu style).
        label_threshold: the oracle threshold that makes the ``select`` labels.
        relufy: swap the FFN activation for ReLU before splitting (:mod:`.relufy`).
        refit: least-squares refit of each FFN's second layer at the operating point
            (:mod:`.refit`).
        refit_ridge: relative ridge of the refit (toward the old weights).
        flop_budget: if set, per-layer thresholds fitted to this mean FFN FLOP fraction
            (:mod:`.budget`) instead of one global ``threshold``.
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
    router_target: str = "share"
    label_threshold: float = 0.5
    relufy: bool = False
    refit: bool = False
    refit_ridge: float = 1e-2
    flop_budget: float | None = None
    seed: int = 0
    backend: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field (and its ``xmoe convert`` flag)."""
        check_int("num_experts (--experts)", self.num_experts, 1)
        check_choice("split (--split)", self.split, SPLITS)
        check_choice("router (--router)", self.router, ROUTERS)
        check_threshold(self.threshold)
        for name in ("calib_tokens", "router_steps", "router_batch"):
            check_int(f"{name} (--{name.replace('_', '-')})", getattr(self, name), 1)
        check_positive("router_lr", self.router_lr)
        check_choice("router_target (--router-target)", self.router_target, ROUTER_TARGETS)
        check_range(
            "label_threshold (--label-threshold)", self.label_threshold, 0.0, 1.0, low_open=True
        )
        check_positive("refit_ridge (--refit-ridge)", self.refit_ridge)
        if self.flop_budget is not None:
            check_range("flop_budget (--flop-budget)", self.flop_budget, 0.0, 1.0, low_open=True)
        for name in ("relufy", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} (--{name}) must be a bool, got {getattr(self, name)!r}")


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
            dense,
            groups,
            backend=config.backend,
            threshold=config.threshold,
            mode=config.router,
            router_score=router_score(config),
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


def router_score(config: ConvertConfig) -> str:
    """The slice router's score function for ``config.router_target``."""
    return "sigmoid" if config.router_target == "select" else "softmax"


def fit_router(
    ffn: ConvertedFFN, x: Tensor, config: ConvertConfig, seed: int = 0, bar=None
) -> dict:
    """Fit ``ffn.router``'s logits on calibration inputs ``x: [N, d_model]``.

    ``router_target="share"``: soft-target cross-entropy ``-sum_e q_e log softmax(z)_e`` with
    ``q`` the oracle share (:meth:`ConvertedFFN.oracle_share`); minimising it minimises
    KL(q || p). ``router_target="select"``: binary cross-entropy of ``sigmoid(z_e)`` against
    ``1[the oracle keeps e at label_threshold]``. Returns the final loss (``router_kl`` for
    ``share``, ``router_bce`` and the label / prediction agreement for ``select``).
    """
    import torch.nn.functional as F

    from .router import threshold_routing

    with torch.no_grad():
        q = torch.cat([ffn.oracle_share(c) for c in x.split(4096)])
    select = config.router_target == "select"
    if select:
        r = threshold_routing(q, config.label_threshold)
        target = torch.zeros_like(q)
        target[r.token_idx, r.expert_idx] = 1.0
    else:
        target = q
    router = ffn.router
    with torch.no_grad():
        router.weight.zero_()
        if select:
            mean = target.mean(0).clamp(1e-4, 1 - 1e-4)
            router.bias.copy_((mean / (1 - mean)).log())
        else:
            router.bias.copy_(q.mean(0).clamp_min(1e-8).log())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=config.router_lr)
    n = x.shape[0]

    def loss_of(z: Tensor, y: Tensor) -> Tensor:
        if select:
            return F.binary_cross_entropy_with_logits(z, y)
        return -(y * z.log_softmax(-1)).sum(-1).mean()

    for _ in range(config.router_steps):
        idx = torch.randint(n, (min(config.router_batch, n),), generator=gen)
        loss = loss_of(router.logits(x[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        z = router.logits(x)
        if select:
            agree = ((z > 0).float() == target).float().mean()
            return {
                "router_bce": round(float(loss_of(z, target)), 5),
                "router_label_agreement": round(float(agree), 4),
            }
        logp = z.log_softmax(-1)
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


def set_thresholds(model: nn.Module, thresholds: list[float]) -> None:
    """Give converted FFN l the threshold ``thresholds[l]``."""
    ffns = converted_ffns(model)
    if len(thresholds) != len(ffns):
        raise ValueError(
            f"thresholds: got {len(thresholds)} values for a model with {len(ffns)} converted FFNs"
        )
    for f, t in zip(ffns, thresholds, strict=True):
        f.set_threshold(t)


def set_mode(model: nn.Module, mode: str) -> None:
    """``learned`` / ``oracle`` routing, or ``dense`` (all neurons, plain GEMMs) everywhere."""
    check_choice("mode", mode, MODES)
    for f in _require_converted(model):
        f.set_mode(mode)


def _require_converted(model: nn.Module) -> list[ConvertedFFN]:
    ffns = converted_ffns(model)
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no converted FFNs")
    return ffns


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {
        "xmoe": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
