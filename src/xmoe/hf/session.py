"""One evaluation session on an HF MoE model folder: the model with xmoe inside, HF's own copy
for reference and timing, the tokenised eval and calibration text, and routing points.

A :class:`Point` names one routing: ``native``, ``topk`` (k), ``threshold`` (t, global or per
layer), ``budget`` (per-layer t fitted to a FLOP fraction or a target experts/token on the
calibration text) or ``entropy_k`` (per-layer cut-off fitted the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._checks import check_choice, check_int
from .block import block_family, moe_blocks
from .evaluate import batches, corpus_split, evaluate, time_forwards, token_windows
from .patch import from_pretrained
from .routing import capture_inputs, fit_budget, routing_state, set_routing

POINT_RULES = ("native", "restored", "topk", "threshold", "budget", "entropy_k")


@dataclass
class Point:
    """One routing to evaluate.

    rule: one of :data:`POINT_RULES` (``restored``: the routing of the config's ``xmoe``
    section, as :func:`~xmoe.hf.from_pretrained` set it).
    threshold: t (``threshold``), a float or one per MoE layer.
    k: experts per token (``topk``).
    flop_fraction / target: the budget of ``budget`` and ``entropy_k`` (one of them).
    """

    rule: str
    threshold: float | list[float] | None = None
    k: int | None = None
    flop_fraction: float | None = None
    target: float | None = None
    max_experts: int | None = None  # cap of threshold / budget (e.g. the native k)
    per_layer: bool = True  # budget / entropy_k: one fit per layer, or one for all layers
    candidates: int | None = None  # threshold / budget among the top-c experts (c = native k)

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, POINT_RULES)

    @property
    def label(self) -> str:
        cap = "" if self.max_experts is None else f" (<= {self.max_experts})"
        cap += "" if self.candidates is None else f" in top-{self.candidates}"
        cap += "" if self.per_layer else " global"
        if self.rule == "threshold":
            t = self.threshold
            t = f"{t:g}" if isinstance(t, (int, float)) else ",".join(f"{v:g}" for v in t)
            return f"t={t}{cap}"
        if self.rule == "topk":
            return f"k={self.k}"
        if self.rule in ("budget", "entropy_k"):
            if self.flop_fraction is not None:
                return f"{self.flop_fraction:.1%} FLOPs{cap}".replace(".0%", "%")
            return f"{self.target:g} experts/token{cap}"
        return self.rule


@dataclass
class SessionConfig:
    model: str
    data: str | None = None  # text file or folder; None: the embedded Shakespeare corpus
    val_fraction: float = 0.05  # xmoe train's default split
    seq_len: int | None = None  # default: min(max_position_embeddings, 256)
    max_tokens: int = 16384  # predicted eval tokens
    calib_tokens: int = 4096  # calibration tokens (from the train split)
    batch_size: int = 8
    backend: str = "auto"
    reference: bool = True  # also load HF's own model (native check and timing)
    extra: dict = field(default_factory=dict)


class Session:
    """The loaded model, its HF reference, and the eval / calibration windows."""

    def __init__(self, cfg: SessionConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_int("batch_size", cfg.batch_size, 1)
        self.cfg = cfg
        path = str(cfg.model)
        if not Path(path).exists():
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = from_pretrained(path, backend=cfg.backend).eval()
        self.restored = routing_state(self.model)
        self.reference = (
            AutoModelForCausalLM.from_pretrained(path).eval() if cfg.reference else None
        )
        max_pos = getattr(self.model.config, "max_position_embeddings", 256) or 256
        self.seq_len = cfg.seq_len or min(int(max_pos), 256)
        train, val = corpus_split(cfg.data, cfg.val_fraction)
        self.windows = token_windows(self.tokenizer, val, self.seq_len, cfg.max_tokens)
        calib_chars = max(cfg.calib_tokens * 8, 10_000)  # enough characters for the tokens
        self.calib = token_windows(
            self.tokenizer, train[:calib_chars], self.seq_len, cfg.calib_tokens
        )
        self._calib_inputs: list[torch.Tensor] | None = None

    @property
    def blocks(self):
        return moe_blocks(self.model)

    def calib_inputs(self) -> list[torch.Tensor]:
        """Each MoE block's inputs on the calibration windows, under native routing."""
        if self._calib_inputs is None:
            set_routing(self.model, "native")
            ids = (w[:, :-1] for w in batches(self.calib, self.cfg.batch_size))
            self._calib_inputs = capture_inputs(self.model, ids, self.cfg.calib_tokens)
        return self._calib_inputs

    def apply(self, point: Point) -> dict:
        """Set the model's routing to ``point``; returns what was fitted (budget rules)."""
        if point.rule == "native":
            set_routing(self.model, "native")
        elif point.rule == "restored":
            for b, opts in zip(self.blocks, self.restored):
                b.use_routing(**{k: v for k, v in opts.items() if k in b.native_options})
        elif point.rule == "topk":
            set_routing(self.model, "topk", k=point.k)
        elif point.rule == "threshold":
            set_routing(
                self.model,
                "threshold",
                threshold=point.threshold,
                max_experts=point.max_experts,
                candidates=point.candidates,
            )
        else:
            rule = "threshold" if point.rule == "budget" else "entropy_k"
            inputs = self.calib_inputs()
            fitted = fit_budget(
                self.model,
                inputs,
                target_experts_per_token=point.target,
                flop_fraction=point.flop_fraction,
                rule=rule,
                max_experts=point.max_experts if rule == "threshold" else None,
                candidates=point.candidates if rule == "threshold" else None,
                per_layer=point.per_layer,
            )
            return {"fitted": fitted}
        return {}

    def evaluate(self, point: Point) -> dict:
        """Apply ``point`` and evaluate it on the eval windows."""
        info = self.apply(point)
        row = {"rule": point.rule, "setting": point.label}
        row.update(evaluate(self.model, self.windows, self.cfg.batch_size))
        row.update(info)
        return row

    @torch.no_grad()
    def native_check(self) -> float:
        """Max |logit difference| between HF's model and the patched one at native routing."""
        if self.reference is None:
            return float("nan")
        set_routing(self.model, "native")
        ids = self.windows[: self.cfg.batch_size, :-1]
        a = self.reference(input_ids=ids).logits
        b = self.model(input_ids=ids).logits
        return float((a - b).abs().max())

    def timing(self, points: dict[str, Point], repeats: int = 5) -> dict:
        """Median seconds on one eval batch, two ways: the whole forward (``model: ...``) and
        the MoE blocks alone on their captured inputs (``blocks: ...``). HF's own model runs
        each experts implementation transformers offers here; the patched model runs each
        named point. All variants are interleaved in one process."""
        ids = self.windows[: self.cfg.batch_size, :-1]
        set_routing(self.model, "native")
        inputs = capture_inputs(self.model, [ids], max_tokens=ids.numel())
        shape = (ids.shape[0], ids.shape[1], -1)
        variants = {}
        if self.reference is not None:
            ref = self.reference
            hf_blocks = [m for m in ref.modules() if block_family(m) is not None]
            default = ref.config._experts_implementation  # what transformers picked at load
            impls = [default] + [i for i in ("eager", "grouped_mm", "batched_mm") if i != default]
            for impl in impls:
                try:
                    ref.set_experts_implementation(impl)
                    ref(input_ids=ids[:1, :8])
                except Exception:  # noqa: BLE001 - not available for this model / install
                    continue
                tag = " (default)" if impl == default else ""
                setup = lambda impl=impl: ref.set_experts_implementation(impl)
                variants[f"model: hf {impl}{tag}"] = (setup, lambda: ref(input_ids=ids))
                variants[f"blocks: hf {impl}{tag}"] = (
                    setup,
                    lambda: [b(x.view(shape)) for b, x in zip(hf_blocks, inputs)],
                )
            ref.set_experts_implementation(default)
        for name, point in points.items():
            self.apply(point)
            state = routing_state(self.model)

            def setup(state=state):
                for b, opts in zip(self.blocks, state):
                    b.use_routing(**opts)

            variants[f"model: xmoe {name}"] = (setup, lambda: self.model(input_ids=ids))
            variants[f"blocks: xmoe {name}"] = (
                setup,
                lambda: [b(x.view(shape)) for b, x in zip(self.blocks, inputs)],
            )
        return time_forwards(variants, repeats=repeats)
