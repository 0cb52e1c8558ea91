"""Translation scores (sacreBLEU BLEU and chrF++) and the FFN FLOP count the encoder MoE
figures are made of."""

from __future__ import annotations


def scores(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU BLEU and chrF++ (word_order=2) of ``hyps`` against one reference each."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    chrf = sacrebleu.metrics.CHRF(word_order=2).corpus_score(hyps, [refs]).score
    return {"bleu": bleu, "chrf": chrf}


def ffn_flops(d_model: int, width: int, activation: str) -> int:
    """Multiply-add FLOPs (2 per MAC) of one token through an FFN of hidden ``width``."""
    return (6 if activation == "swiglu" else 4) * d_model * width
