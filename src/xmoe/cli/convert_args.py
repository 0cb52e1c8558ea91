"""Flag strings of ``xmoe convert``, ``convert-eval`` and ``convert-sweep`` -> typed values.

Each parser names its flag and the accepted range in the ``ValueError`` it raises. Heavy imports
(torch, the convert package) happen inside the functions so ``xmoe --help`` stays fast.
"""

from __future__ import annotations


def parse_floats(flag: str, text: str) -> list[float]:
    """Comma-separated numbers, each in (0, 1]."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or not all(0.0 < v <= 1.0 for v in vals):
        raise ValueError(f"{flag} must be comma-separated numbers in (0, 1], got {text!r}")
    return vals


def parse_thresholds(flag: str, text: str) -> list:
    """Comma-separated t values in (0, 1], each possibly ``saved``."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    nums = [v for v in parts if v != "saved"]
    vals = parse_floats(flag, ",".join(nums)) if nums else []
    if not parts:
        raise ValueError(
            f"{flag} must be comma-separated numbers in (0, 1] or 'saved', got {text!r}"
        )
    it = iter(vals)
    return ["saved" if v == "saved" else next(it) for v in parts]


def parse_ints(flag: str, text: str) -> list[int]:
    """Comma-separated integers, each >= 1."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return vals


def parse_choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated, non-empty subset of ``allowed``."""
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise ValueError(f"{flag} must be a comma-separated subset of {allowed}, got {text!r}")
    return vals


def require_positive(flag: str, value: int | None) -> None:
    """``value`` is None (not given) or >= 1."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def setup_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads, when given."""
    import torch

    require_positive("--threads", threads)
    if threads:
        torch.set_num_threads(threads)


def eval_config(args, routers: list[str], progress: bool, allow_saved: bool = False):
    """The ``EvalConfig`` of convert-eval / convert-sweep flags (``allow_saved``: t may be
    ``saved``)."""
    from ..convert.convert_eval import EvalConfig

    require_positive("--repeats", args.repeats)
    if args.shakespeare < 0 or args.stdlib < 0:
        raise ValueError("--shakespeare and --stdlib must be >= 0")
    thresholds = (
        parse_thresholds("--thresholds", args.thresholds)
        if allow_saved
        else parse_floats("--thresholds", args.thresholds)
    )
    return EvalConfig(
        thresholds=thresholds,
        routers=routers,
        shakespeare=args.shakespeare,
        stdlib=args.stdlib,
        speed=not args.no_speed,
        repeats=args.repeats,
        progress=progress,
    )
