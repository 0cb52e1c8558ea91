"""Folio → modern spelling translation with MoE in the encoder: the task ``xmoe train --task
translate`` runs (a :class:`~xmoe.train.task.Task`; docs/translation.md).

The model section of the run config (``model``, a :class:`~xmoe.models.gpt.GPTConfig`) is read
as the encoder–decoder's: ``vocab_size`` (the shared subword vocabulary), ``block_size`` (the
most tokens per side, BOS/EOS included), ``n_layer`` (encoder layers, and as many decoder
layers), ``n_head``, ``d_model``, ``d_ff``, ``dropout``, ``activation``, ``moe_every`` (MoE in
every ``moe_every``-th encoder layer; 2 as in the paper) and ``moe`` (the MoE layers).
The translation settings are ``task_options`` (:class:`~.translate_options.TranslateOptions`);
scores and FLOPs are in :mod:`.translate_metrics`, a trained run is loaded by :mod:`.translator`.

Pairs whose source, or target + EOS, is longer than ``block_size`` tokens are left out of
every split (counted in ``data_stats``). Batches are a pure function of (seed, step).
"""

from __future__ import annotations

import math
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.parallel import Pair, load_or_build_corpus, load_or_train_pair_tokenizer
from ..models.beam import decode
from ..models.seq2seq import Seq2Seq
from .config import RunConfig
from .evaluate import load_imbalance
from .step_stats import StepOutput, mean_or_none
from .translate_metrics import ffn_flops, scores
from .translate_options import TranslateOptions, model_config


@dataclass
class Encoded:
    pairs: list[Pair]
    src: list[list[int]]  # source ids + EOS
    tgt: list[list[int]]  # target ids (no BOS/EOS)


def pad(rows: list[list[int]], value: int = 0) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class TranslateTask:
    """Teacher-forced training, greedy/beam evaluation with sacreBLEU; a Task."""

    Options = TranslateOptions

    def __init__(self, cfg: RunConfig) -> None:
        from .tasks import task_options

        self.cfg = cfg
        self.options: TranslateOptions = task_options(cfg)
        self.model_cfg = model_config(cfg, self.options)
        self.model_cfg.validate()
        self.splits: dict[str, Encoded] = {}
        self.tokenizer = None
        self.data_stats: dict = {}
        self.by_length: list[int] = []
        self.tokens_per_step = cfg.train.batch_size * 2 * cfg.model.block_size  # until setup

    # data -----------------------------------------------------------------------------------

    def build_model(self, step: int) -> Seq2Seq:
        return Seq2Seq(self.model_cfg)

    def setup(self, data_dir: Path, model: Seq2Seq) -> None:
        data_dir = Path(data_dir)
        cache = self.options.corpus_cache
        if cache and not (data_dir / "parallel.json").exists():
            src = Path(cache) / "parallel.json"
            if src.exists():
                data_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, data_dir / "parallel.json")
        corpus = load_or_build_corpus(data_dir, self.options.align())
        self.tokenizer = load_or_train_pair_tokenizer(
            data_dir, corpus["train"], self.model_cfg.vocab_size
        )
        stats = {}
        for split, pairs in corpus.items():
            self.splits[split] = self.encode_pairs(pairs)
            stats[split] = {"pairs": len(self.splits[split].pairs), "too_long": len(pairs)}
            stats[split]["too_long"] -= stats[split]["pairs"]
        self.data_stats = stats
        train = self.splits["train"]
        lengths = [len(s) + len(t) + 1 for s, t in zip(train.src, train.tgt)]
        # length buckets: the training pairs by length, ties in a fixed random order
        tie = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        self.by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie[i]))
        self.tokens_per_step = round(
            self.cfg.train.batch_size * sum(lengths) / max(len(lengths), 1)
        )

    def check_data(self) -> None:
        for split in ("train", "val", "test"):
            if not self.splits[split].pairs:
                raise ValueError(
                    f"the {split} split holds no pair within model.block_size="
                    f"{self.model_cfg.max_len} tokens; raise model.block_size or lower "
                    "task_options.min_similarity"
                )

    def encode_pairs(self, pairs: list[Pair]) -> Encoded:
        """Token ids of both sides; pairs over ``max_len`` tokens on either side are left out."""
        eos, cap = self.model_cfg.eos_id, self.model_cfg.max_len
        src = self.tokenizer.encode_batch([p.src for p in pairs])
        tgt = self.tokenizer.encode_batch([p.tgt for p in pairs])
        out = Encoded([], [], [])
        for p, s, t in zip(pairs, src, tgt):
            if len(s.ids) + 1 <= cap and len(t.ids) + 1 <= cap:
                out.pairs.append(p)
                out.src.append(s.ids + [eos])
                out.tgt.append(t.ids)
        return out

    def tensors(self, enc: Encoded, rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(src, tgt_in, tgt_out)`` for ``rows`` of a split, pad-padded."""
        c = self.model_cfg
        src = pad([enc.src[i] for i in rows], c.pad_id)
        tgt_in = pad([[c.bos_id, *enc.tgt[i]] for i in rows], c.pad_id)
        tgt_out = pad([[*enc.tgt[i], c.eos_id] for i in rows], c.pad_id)
        return src, tgt_in, tgt_out

    def train_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """``batch_size`` training pairs of similar length (little padding): a window at a
        random start of the pairs sorted by length; a pure function of (seed, step)."""
        t = self.cfg.train
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        n = len(self.by_length)
        if n <= t.batch_size:
            return self.tensors(self.splits["train"], self.by_length)
        start = int(torch.randint(0, n - t.batch_size + 1, (1,), generator=g))
        return self.tensors(self.splits["train"], self.by_length[start : start + t.batch_size])

    # training -------------------------------------------------------------------------------

    def reshape(self, model: Seq2Seq, step: int) -> str | None:
        return None

    def loss(self, model: Seq2Seq, batch: tuple[Tensor, Tensor, Tensor]) -> StepOutput:
        src, tgt_in, tgt_out = batch
        out = model(src, tgt_in, tgt_out, smoothing=self.options.label_smoothing)
        return StepOutput(out.loss, {"nll": out.nll}, out.routings)

    def routing_summary(
        self, model: Seq2Seq, experts_per_token: list[float], dropped_fraction: list[float]
    ) -> dict:
        return self.flops(model, experts_per_token) | {
            "experts_per_token": list(experts_per_token),
            "dropped_fraction": list(dropped_fraction),
        }

    def flops(self, model: Seq2Seq, experts_per_token: list[float]) -> dict:
        """Active encoder MoE FLOPs per token (experts + router). A dense model reports its
        FFNs at the positions the MoE runs make MoE (every ``moe_every``-th, else 2nd layer)."""
        c = self.model_cfg
        enc = model.encoder_moe_layers
        if not enc:
            every = c.encoder_moe_every or 2
            n = sum(1 for i in range(c.n_encoder_layers) if (i + 1) % every == 0)
            dense = n * ffn_flops(c.d_model, c.d_ff, c.activation)
            return {"enc_moe_flops_per_token": dense, "enc_moe_flops_ratio": 1.0}
        total = 0.0
        for m, ept in zip(enc, experts_per_token):
            act = self.cfg.model.moe.activation
            total += ept * ffn_flops(c.d_model, m.d_expert, act) + 2 * c.d_model * m.num_experts
        dense = len(enc) * ffn_flops(c.d_model, c.d_ff, c.activation)
        return {"enc_moe_flops_per_token": total, "enc_moe_flops_ratio": total / dense}

    # evaluation -----------------------------------------------------------------------------

    def subset(self, split: str) -> list[int]:
        """The first ``eval_sentences`` rows of a fixed shuffle (the same in every run)."""
        n = len(self.splits[split].src)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        k = self.options.eval_sentences
        return sorted(order[:k] if k else order)

    @torch.no_grad()
    def loss_and_routing(self, model: Seq2Seq, split: str, max_tokens: int | None) -> dict:
        """Per-token NLL (no smoothing) and token-weighted routing figures over ``split``."""
        enc = self.splits[split]
        rows = list(range(len(enc.src)))
        if max_tokens is not None:
            count, cut = 0, len(rows)
            for i in rows:
                count += len(enc.tgt[i]) + 1
                if count >= max_tokens:
                    cut = i + 1
                    break
            rows = rows[:cut]
        bs = self.cfg.train.eval_batch_size
        nll, tokens = 0.0, 0
        n_moe = len(model.moe_layers)
        pairs, routed, selected = [0] * n_moe, [0] * n_moe, [0] * n_moe
        loads = [torch.zeros(m.num_experts, dtype=torch.long) for m in model.moe_layers]
        for start in range(0, len(rows), bs):
            src, tgt_in, tgt_out = self.tensors(enc, rows[start : start + bs])
            out = model(src, tgt_in, tgt_out)
            n = int((tgt_out != self.model_cfg.pad_id).sum())
            nll += out.nll.item() * n
            tokens += n
            for i, r in enumerate(out.routings):
                pairs[i] += r.num_pairs
                routed[i] += r.num_tokens
                selected[i] += r.num_selected or 0
                loads[i] += r.expert_counts.cpu()
        ept = [p / max(t, 1) for p, t in zip(pairs, routed)]
        n_enc = len(model.encoder_moe_layers)
        return {
            "loss": nll / tokens,
            "ppl": math.exp(min(nll / tokens, 50.0)),
            "tokens": tokens,
            "experts_per_token": ept,
            "dropped_fraction": [1 - p / s if s else 0.0 for p, s in zip(pairs, selected)],
            "load_imbalance": [load_imbalance(c) for c in loads],
            **self.flops(model, ept[:n_enc]),
        }

    @torch.no_grad()
    def translate_ids(
        self, model: Seq2Seq, sources: list[list[int]], beam: int, batch_size: int = 64
    ) -> list[str]:
        """Decoded strings for token-id sources (each ending in EOS), in order."""
        out = [""] * len(sources)
        c = self.model_cfg
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # less padding
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids = decode(
                model, pad([sources[i] for i in rows], c.pad_id), beam, self.options.length_penalty
            )
            for i, hyp in zip(rows, ids):
                out[i] = self.tokenizer.decode(hyp, skip_special_tokens=True)
        return out

    def bleu(self, model: Seq2Seq, split: str, beam: int) -> dict:
        enc = self.splits[split]
        rows = self.subset(split)
        hyps = self.translate_ids(model, [enc.src[i] for i in rows], beam)
        refs = [enc.pairs[i].tgt for i in rows]
        copy = scores([enc.pairs[i].src for i in rows], refs)
        return {
            **scores(hyps, refs),
            "copy_bleu": copy["bleu"],
            "copy_chrf": copy["chrf"],
            "sentences": len(rows),
            "examples": [
                {"src": enc.pairs[i].src, "hyp": h, "ref": enc.pairs[i].tgt}
                for i, h in zip(rows[:5], hyps[:5])
            ],
        }

    def evaluate(self, model: Seq2Seq, max_tokens: int | None) -> dict:
        was_training = model.training
        model.eval()
        try:
            result = {
                f"val_{k}": v for k, v in self.loss_and_routing(model, "val", max_tokens).items()
            }
            if max_tokens is None:  # the final evaluation: scores, val greedy and test with beam
                result |= {f"val_{k}": v for k, v in self.bleu(model, "val", 1).items()}
                test = self.bleu(model, "test", self.options.beam)
                result |= {f"test_{k}": v for k, v in test.items()}
        finally:
            model.train(was_training)
        return result

    def describe(self, result: dict) -> str:
        line = f"val_loss {result['val_loss']:.4f} val_ppl {result['val_ppl']:.2f}"
        if "test_bleu" in result:
            line += f" val_bleu {result['val_bleu']:.2f} test_bleu {result['test_bleu']:.2f}"
            line += f" test_chrf++ {result['test_chrf']:.2f}"
        return line

    def compute_ratio(self, model: Seq2Seq, experts_per_token: list[float]) -> float | None:
        """Expert FLOPs per token over the dense FFN's, mean over MoE layers (as the GPT's)."""
        d_ff = self.model_cfg.d_ff
        ratios = [m.compute_ratio(e, d_ff) for m, e in zip(model.moe_layers, experts_per_token)]
        return sum(ratios) / len(ratios) if ratios else None

    def unigram_ppl(self) -> float:
        """Val target perplexity of the add-one unigram model of the training targets."""
        vocab = self.model_cfg.vocab_size
        eos = self.model_cfg.eos_id
        train = torch.tensor([i for t in self.splits["train"].tgt for i in t + [eos]])
        counts = torch.bincount(train, minlength=vocab).double() + 1.0
        logp = (counts / counts.sum()).log()
        val = torch.tensor([i for t in self.splits["val"].tgt for i in t + [eos]])
        return float((-logp[val].mean()).exp())

    def summary(self, model: Seq2Seq, state: dict, final: dict) -> dict:
        m = self.cfg.model
        keep = ("loss", "ppl", "bleu", "chrf", "copy_bleu", "copy_chrf", "sentences", "examples")
        out = {k: final[k] for k in final if k.removeprefix("val_").removeprefix("test_") in keep}
        ept = final["val_experts_per_token"]
        return {
            **out,
            "experts_per_token_per_layer": ept,
            "experts_per_token": sum(ept) / len(ept) if ept else None,
            "dropped_fraction": final["val_dropped_fraction"],
            "enc_moe_flops_per_token": final["val_enc_moe_flops_per_token"],
            "enc_moe_flops_ratio": final["val_enc_moe_flops_ratio"],
            "moe_compute_ratio": self.compute_ratio(model, ept),
            "load_imbalance": mean_or_none(final["val_load_imbalance"]),
            "load_imbalance_per_layer": final["val_load_imbalance"],
            "unigram_ppl": self.unigram_ppl(),
            "train_tokens_per_s": state["tokens_seen"] / max(state["train_time_s"], 1e-9),
            "data": self.data_stats,
            "beam": self.options.beam,
            "length_penalty": self.options.length_penalty,
            "steps": state["step"],
            "tokens_seen": state["tokens_seen"],
            "train_time_s": state["train_time_s"],
            "params": model.num_params(),
            "router": m.moe.router,
            "router_options": m.moe.router_options,
            "num_experts": m.moe.num_experts,
            "d_expert": m.moe.d_expert,
            "d_ff": m.d_ff,
            "encoder_moe_layers": len(model.encoder_moe_layers),
            "moe_layers": len(model.moe_layers),
            "env": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        }
