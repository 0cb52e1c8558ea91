"""The summary ``xmoe train`` prints: the LM's perplexity, or another task's own figures."""

from pathlib import Path

from xmoe.cli.train import summary_lines

COUNTERS = {"steps": 3, "tokens_seen": 300, "train_time_s": 1.0, "train_tokens_per_s": 300.0}


def test_lm_summary_shows_perplexity():
    s = {**COUNTERS, "task": "lm", "val_ppl": 12.5, "val_loss": 2.526, "unigram_ppl": 40.0}
    text = summary_lines(s, Path("runs/x"))
    assert "val_ppl          12.50" in text and "unigram baseline ppl 40.0" in text


def test_other_task_summary_shows_its_figures_without_lm_keys():
    s = {**COUNTERS, "task": "translate", "val_bleu": 31.25, "val_chrf": 60.5, "note": "x"}
    text = summary_lines(s, Path("runs/x"))
    assert "translate" in text and "val_bleu" in text and "31.2500" in text
    assert "val_ppl" not in text and "note" not in text
