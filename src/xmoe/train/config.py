"""Run configuration: nested dataclasses, loaded from YAML, with ``key.path=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..models.gpt import GPTConfig


@dataclass
class DataConfig:
    path: str | None = None  # None: the embedded Shakespeare corpus; else a UTF-8 file or folder
    vocab_size: int = 4096  # byte-level BPE size; small enough that the embedding stays cheap
    val_fraction: float = 0.05  # tail of every document held out for validation


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate (small model, short run)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 200
    eval_tokens: int = 32768  # val tokens per periodic eval (final eval uses all)
    eval_batch_size: int = 32
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 1337
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    time_limit_s: float = 0.0  # stop early (with a checkpoint) after this many seconds; 0: none


@dataclass
class ParallelConfig:
    """Multi-process layout (``torchrun --nproc_per_node W``; docs/distributed.md).

    The world size W comes from torchrun; every rank reads ``train.batch_size / W`` sequences of
    each global batch. Non-expert parameters are data-parallel over all W ranks.
    """

    # P: ranks that share one copy of the experts, each holding num_experts / P of them
    # (1 = every rank holds all experts: pure data parallelism). Must divide W and num_experts.
    expert_parallel: int = 1


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        self.model.validate()
        t = self.train
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            if not (isinstance(getattr(t, name), int) and getattr(t, name) >= 1):
                raise ValueError(f"train.{name} must be an integer >= 1, got {getattr(t, name)!r}")
        for name in ("warmup_steps", "checkpoint_every", "threads", "eval_tokens"):
            if not (isinstance(getattr(t, name), int) and getattr(t, name) >= 0):
                raise ValueError(f"train.{name} must be an integer >= 0, got {getattr(t, name)!r}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise ValueError(f"train.lr must be > 0, got {t.lr}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if t.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {t.grad_clip}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        self.validate_parallel()
        if self.data.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"data.vocab_size ({self.data.vocab_size}) must equal model.vocab_size "
                f"({self.model.vocab_size})"
            )

    def validate_parallel(self) -> None:
        """The checks of ``parallel`` that need no process group (world size: at launch)."""
        p = self.parallel.expert_parallel
        if not (isinstance(p, int) and not isinstance(p, bool) and p >= 1):
            raise ValueError(f"parallel.expert_parallel must be an integer >= 1, got {p!r}")
        if p == 1 or self.model.moe_every == 0:
            return
        e = self.model.moe.num_experts
        if e % p:
            raise ValueError(
                f"model.moe.num_experts={e} is not divisible by parallel.expert_parallel={p}: "
                "each rank must hold the same number of experts"
            )
        if self.model.moe.evo:
            raise ValueError(
                "model.moe.evo (EvoMoE: one expert per layer until diversify_step) does not "
                f"support parallel.expert_parallel={p}; use expert_parallel=1 (data parallel)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by their full path."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown config key {path!r}; accepted: {sorted(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(path, hint, value)
    return cls(**kwargs)


def _coerce(path: str, hint, value):
    """Light type check/coercion for scalar config values (ints accepted where floats are)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, inner[0], value) if len(inner) == 1 else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"config key {path!r} must be {hint.__name__}, got {value!r}")
    if (hint is dict or origin is dict) and not isinstance(value, dict):
        raise ValueError(f"config key {path!r} must be a mapping, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a config section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML file ← overrides; validated."""
    data: dict = asdict(RunConfig())
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        data = _merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def _merge(base: dict, new: dict) -> dict:
    if not isinstance(new, dict):
        raise ValueError(f"config file must hold a mapping, got {new!r}")
    out = dict(base)
    for k, v in new.items():
        # router_options / loss_coefs are replaced whole, other sections merge key by key.
        if (
            isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and k
            not in (
                "router_options",
                "loss_coefs",
            )
        ):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
