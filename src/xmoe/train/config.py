"""Run configuration: nested dataclasses, loaded from YAML, merged with dotted-key overrides.

``load_config(path, *overrides)`` is defaults ← YAML file ← each override layer, validated.
An override layer maps dotted keys to Python values (``{"model.moe.router": "topk"}``); only the
CLI's ``--set key=value`` strings are parsed (as YAML) here, by :func:`parse_overrides`.
:func:`with_overrides` merges layers into a loaded config. Unknown keys raise ``ValueError``
naming the full key (``model.moe.bogus``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .._checks import check_bool, check_choice, check_int, check_positive, check_range
from .._io import atomic_write
from ..models.gpt import GPTConfig
from .model_checks import validate_model
from .precision import PRECISIONS
from .typed import from_dict

# A layer of overrides: dotted keys -> Python values, or the CLI's "key=value" strings.
Overrides = Mapping[str, object] | Sequence[str]


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
    # stop early (with a checkpoint) after this many seconds; 0 or null: no limit
    time_limit_s: float | None = 0.0
    # fp32, or bf16 autocast (fp32 master weights and routers); auto: bf16 where the hardware
    # has native bf16 (AVX-512 BF16 / AMX / CUDA), else fp32 (train/precision.py).
    precision: str = "fp32"
    # TensorBoard event files under <run>/tensorboard/ (needs the `tensorboard` package)
    tensorboard: bool = False


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
    # what is trained (train/tasks.py): "lm" (the GPT language model), "exit", "translate"
    task: str = "lm"
    # the task's own settings; each task documents and checks its keys (task_options.KEY)
    task_options: dict = field(default_factory=dict)
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        from .tasks import task_options

        task_options(self)  # the task name and its options
        self.model.validate()
        t = self.train
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            check_int(f"train.{name}", getattr(t, name), 1)
        for name in ("warmup_steps", "checkpoint_every", "eval_tokens", "seed"):
            check_int(f"train.{name}", getattr(t, name), 0)
        check_int("train.threads", t.threads, 0, 1024)  # 0: torch's default
        check_positive("train.lr", t.lr)
        check_range("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
        check_range("train.weight_decay", t.weight_decay, 0.0, math.inf)
        check_range("train.beta1", t.beta1, 0.0, 1.0, high_open=True)
        check_range("train.beta2", t.beta2, 0.0, 1.0, high_open=True)
        check_range("train.grad_clip", t.grad_clip, 0.0, math.inf)  # 0 disables clipping
        if t.time_limit_s is not None:  # 0 or null: no limit
            check_range("train.time_limit_s", t.time_limit_s, 0.0, math.inf)
        check_bool("train.tensorboard", t.tensorboard)
        check_choice("train.precision", t.precision, PRECISIONS)
        check_range(
            "data.val_fraction", self.data.val_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        if self.data.path is not None and not isinstance(self.data.path, str):
            raise ValueError(f"data.path must be a file or folder name, got {self.data.path!r}")
        validate_model(self.model)
        if self.model.moe.evo is not None:  # diversify inside the run: [1, train.steps)
            check_int(
                "model.moe.evo.diversify_step", self.model.moe.evo.diversify_step, 1, t.steps - 1
            )
        self.validate_parallel()
        if self.task == "lm":
            # byte-level BPE: 256 bytes + end-of-text (data/tokenizer.py)
            check_int("data.vocab_size", self.data.vocab_size, 257)
        if self.task == "lm" and self.data.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"data.vocab_size ({self.data.vocab_size}) must equal model.vocab_size "
                f"({self.model.vocab_size})"
            )

    def validate_parallel(self) -> None:
        """The checks of ``parallel`` that need no process group (world size: at launch)."""
        p = check_int("parallel.expert_parallel", self.parallel.expert_parallel, 1)
        if p == 1 or self.model.moe_every == 0:
            return
        e = self.model.moe.num_experts
        if e % p:
            raise ValueError(
                f"model.moe.num_experts={e} is not divisible by parallel.expert_parallel={p}: "
                "each rank must hold the same number of experts"
            )
        if self.model.moe.evo is not None:
            raise ValueError(
                "model.moe.evo (EvoMoE: one expert per layer until diversify_step) does not "
                f"support parallel.expert_parallel={p}; use expert_parallel=1 (data parallel)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """The CLI's ``--set a.b.c=value`` strings → ``{"a.b.c": value}`` (values parsed as YAML;
    a later item for the same key wins and counts as the later one)."""
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set expects key=value with a dotted key, got {item!r}")
        out.pop(key, None)
        out[key] = parse_yaml(raw, f"--set {key}") if raw != "" else None
    return out


class _Loader(yaml.SafeLoader):
    """YAML as users write it: PyYAML follows YAML 1.1, where ``3e-4`` and ``1e3`` (no dot)
    are strings; here every float spelling (YAML 1.2's) is a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str, source: str) -> object:
    """``text`` parsed as YAML (:class:`_Loader`); a ``ValueError`` naming ``source`` and the
    line of a syntax error."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{source}:{where} invalid YAML: {problem}") from None


def read_yaml_file(path: str | Path) -> object:
    """A YAML file's contents; a ``ValueError`` for a missing, unreadable or malformed file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {str(p)!r} cannot be read as UTF-8 text: {exc}") from None
    return parse_yaml(text, f"config file {str(p)!r}")


def with_overrides(cfg: RunConfig, *layers: Overrides) -> RunConfig:
    """A validated copy of ``cfg`` with each layer of dotted-key overrides applied in order,
    e.g. ``with_overrides(cfg, {"model.moe.router": "topk", "model.moe.router_options":
    {"k": 2}})``. A value may be a sub-config dataclass or its mapping."""
    return _build(cfg.to_dict(), layers)


def load_config(path: str | Path | None = None, *overrides: Overrides) -> RunConfig:
    """Defaults ← YAML file ← each override layer; validated."""
    data: dict = asdict(RunConfig())
    if path is not None:
        loaded = read_yaml_file(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {loaded!r}")
        data = _merge(data, loaded)
    return _build(data, overrides)


def _build(data: dict, layers: Sequence[Overrides | None]) -> RunConfig:
    for layer in layers:
        if layer is None:
            continue
        items = layer if isinstance(layer, Mapping) else parse_overrides(layer)
        for key, value in items.items():
            _set(data, key, value)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def _set(data: dict, key: str, value: object) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"`` (sections created as needed)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part!r} is not a config section")
    node[parts[-1]] = copy.deepcopy(value)


def _merge(base: dict, new: dict) -> dict:
    if not isinstance(new, dict):
        raise ValueError(f"config file must hold a mapping, got {new!r}")
    out = dict(base)
    for k, v in new.items():
        # router_options / loss_coefs are replaced whole, other sections merge key by key.
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACED_WHOLE:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


_REPLACED_WHOLE = ("router_options", "loss_coefs")
