"""The translation task's settings (``task_options`` of ``xmoe train --task translate``) and
the mapping of the run config's model section onto the encoder–decoder's config."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int, check_range
from ..data.parallel import AlignOptions
from ..models.seq2seq_config import Seq2SeqConfig
from .config import RunConfig


@dataclass
class TranslateOptions:
    decoder_moe_every: int = 0  # MoE in the decoder too (0: dense decoder, as in the paper)
    label_smoothing: float = 0.1  # fairseq's transformer_wmt_en_de recipe
    beam: int = 4  # final test decoding (1: greedy)
    length_penalty: float = 1.0  # score / length ** length_penalty
    # final BLEU/chrF++ on the first N pairs of a fixed shuffle of val and of test (0: all)
    eval_sentences: int = 400
    min_similarity: float = 0.6  # alignment floor (data/parallel.py)
    max_lines: int = 3
    max_chars: int = 200
    corpus_cache: str | None = None  # a folder whose parallel.json is copied in (grids share it)

    def validate(self) -> None:
        check_int("task_options.decoder_moe_every", self.decoder_moe_every, 0)
        check_range("task_options.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_int("task_options.beam", self.beam, 1)
        check_range("task_options.length_penalty", self.length_penalty, 0.0, 10.0)
        check_int("task_options.eval_sentences", self.eval_sentences, 0)
        self.align().validate()

    def align(self) -> AlignOptions:
        return AlignOptions(self.min_similarity, self.max_lines, self.max_chars)


def model_config(cfg: RunConfig, options: TranslateOptions) -> Seq2SeqConfig:
    m = cfg.model
    return Seq2SeqConfig(
        vocab_size=m.vocab_size,
        max_len=m.block_size,
        n_encoder_layers=m.n_layer,
        n_decoder_layers=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        d_ff=m.d_ff,
        encoder_moe_every=m.moe_every,
        decoder_moe_every=options.decoder_moe_every,
        dropout=m.dropout,
        activation=m.activation,
        moe=m.moe,
    )
