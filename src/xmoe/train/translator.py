"""A trained translate run, loaded to translate new lines (``xmoe translate``)."""

from __future__ import annotations

from pathlib import Path

from .._checks import check_int
from .translate_task import TranslateTask


class Translator:
    """A trained translate run, loaded for ``xmoe translate`` (the tokenizer and the
    checkpoint's weights; the corpus is not rebuilt)."""

    def __init__(self, run_dir: str | Path) -> None:
        from ..data.parallel import load_pair_tokenizer
        from .checkpoint import load_weights
        from .run_dir import RunDir

        run = RunDir(run_dir)
        cfg = run.load_config()
        if cfg.task != "translate":
            raise ValueError(f"run dir {str(run.path)!r} is a {cfg.task!r} run, not translate")
        ckpt = run.checkpoint()
        if ckpt is None:
            raise ValueError(f"run dir {str(run.path)!r} has no checkpoint")
        self.task = TranslateTask(cfg)
        self.task.tokenizer = load_pair_tokenizer(run.data_dir, self.task.model_cfg.vocab_size)
        self.model = self.task.build_model(0)
        load_weights(ckpt, self.model)
        self.model.eval()

    def translate(
        self, lines: list[str], beam: int | None = None, truncate: bool = False
    ) -> list[str]:
        """One output line per input line (an empty line stays empty). A source longer than
        the model's ``block_size`` raises ``ValueError`` naming the line, or with ``truncate``
        keeps its first ``block_size - 1`` tokens."""
        beam = self.task.options.beam if beam is None else check_int("beam", beam, 1)
        c = self.task.model_cfg
        sources, where = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            ids = self.task.tokenizer.encode(line.strip()).ids
            if len(ids) + 1 > c.max_len:
                if not truncate:
                    raise ValueError(
                        f"input line {n} has {len(ids)} tokens; the model takes at most "
                        f"{c.max_len - 1} (model.block_size={c.max_len} with EOS); split the "
                        "line or pass --truncate"
                    )
                ids = ids[: c.max_len - 1]
            sources.append(ids + [c.eos_id])
            where.append(n - 1)
        out = [""] * len(lines)
        for i, text in zip(where, self.task.translate_ids(self.model, sources, beam)):
            out[i] = text
        return out
