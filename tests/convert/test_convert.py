"""Dense → sparse conversion of HF models (``xmoe convert``), on tiny random configs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xmoe.cli import main  # noqa: E402
from xmoe.convert import (  # noqa: E402
    ConvertConfig,
    ConvertedFFN,
    calibration_batches,
    capture_ffn_inputs,
    convert_model,
    converted_ffns,
    find_ffns,
    load_converted,
    save_converted,
    set_mode,
    set_threshold,
    split_neurons,
)
from xmoe.convert.ffn import DenseFFN, threshold_routing  # noqa: E402

D, D_FF, LAYERS, VOCAB = 16, 32, 2, 50
# Large init: FFN pre-activations of order 1, where GELU variants differ (GPT-2's tanh GELU vs
# the exact one by up to ~1e-3), so an exactness test would catch the wrong activation.
INIT = 0.3


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=32,
        initializer_range=INIT,
    )
    return transformers.BertModel(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=D,
        n_layer=LAYERS,
        n_head=2,
        n_inner=D_FF,
        n_positions=32,
        initializer_range=INIT,
    )
    return transformers.GPT2Model(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=32,
        initializer_range=INIT,
    )
    return transformers.LlamaModel(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def random_batches(n_batches=3, batch=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2 :] = 0  # some padding: captured rows must skip it
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def converted(name, split="coact", experts=4, steps=20, **kw):
    model = MODELS[name]()
    batches = random_batches()
    dense_out = hidden(model, batches[0])
    cfg = ConvertConfig(num_experts=experts, split=split, calib_tokens=64, router_steps=steps, **kw)
    manifest = convert_model(model, cfg, batches)
    return model, dense_out, batches, manifest


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_all_experts_selected_reproduces_dense_model(name):
    model, dense_out, batches, manifest = converted(name)
    assert manifest["adapter"] == name
    ffns = converted_ffns(model)
    assert len(ffns) == LAYERS
    assert not any(
        isinstance(m, torch.nn.Linear) and m.out_features == D_FF for m in model.modules()
    )
    set_threshold(model, 1.0)
    out = hidden(model, batches[0])
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    assert all(f.last_pairs == f.last_tokens * 4 for f in ffns)  # every expert ran
    # The oracle router keeps everything at t = 1 too.
    set_mode(model, "oracle")
    torch.testing.assert_close(hidden(model, batches[0]), dense_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_converted_ffn_matches_dense_ffn_module_by_module(name):
    model = MODELS[name]()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    x = torch.randn(7, D)
    groups = split_neurons("random", dense, 8, seed=3)
    ffn = ConvertedFFN.from_dense(dense, groups, threshold=1.0)
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    set_dense = ConvertedFFN.from_dense(dense, groups, mode="dense")
    torch.testing.assert_close(set_dense(x), dense(x), atol=1e-5, rtol=1e-5)
    # The sliced experts are a permutation of the neurons: to_dense() holds the same rows.
    back = ffn.to_dense()
    perm = groups.flatten()
    torch.testing.assert_close(back.w1, dense.w1[perm])
    torch.testing.assert_close(back.w2, dense.w2[:, perm])


@pytest.mark.parametrize(
    "name, backend", [("bert", "segment"), ("gpt2", "loop"), ("llama", "segment")]
)
def test_hf_activation_is_used_exactly(name, backend):
    model = MODELS[name]()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    ffn = ConvertedFFN.from_dense(dense, split_neurons("random", dense, 4), threshold=1.0)
    assert ffn.experts.resolve_backend(torch.float32) == backend
    x = 3 * torch.randn(64, D)  # pre-activations well into the nonlinear range
    torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    if name == "gpt2":  # the exact GELU would be measurably off: the test can fail
        exact = DenseFFN(dense.w1, dense.b1, dense.w2, dense.b2, torch.nn.functional.gelu)
        assert (exact(x) - dense(x)).abs().max() > 1e-4


def test_gpt2_conv1d_weights_are_transposed_to_linear_layout():
    model = tiny_gpt2()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    assert dense.w1.shape == (D_FF, D) and dense.w2.shape == (D, D_FF)
    x = torch.randn(5, D)
    mlp = site.owner
    torch.testing.assert_close(dense(x), mlp.c_proj(mlp.act(mlp.c_fc(x))))


def test_bert_keeps_layernorm_and_residual():
    model, *_ = converted("bert")
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, ConvertedFFN)
    assert isinstance(layer.output.dense, torch.nn.Identity)
    assert isinstance(layer.output.LayerNorm, torch.nn.LayerNorm)


# ------------------------------------------------------------------------------ threshold


def test_lower_threshold_keeps_fewer_experts_and_t1_is_exact():
    model, dense_out, batches, _ = converted("bert", experts=8, steps=50)
    ffns = converted_ffns(model)
    pairs = {}
    for t in (1.0, 0.9, 0.5, 0.1):
        set_threshold(model, t)
        out = hidden(model, batches[1])
        pairs[t] = sum(f.last_pairs for f in ffns)
        tokens = sum(f.last_tokens for f in ffns)
        if t == 1.0:
            full = out
    assert pairs[1.0] == tokens * 8
    assert pairs[1.0] > pairs[0.9] >= pairs[0.5] >= pairs[0.1] >= tokens  # at least 1 per token
    assert pairs[0.5] < pairs[1.0]
    set_threshold(model, 1.0)
    torch.testing.assert_close(hidden(model, batches[1]), full)


def test_threshold_routing_keeps_smallest_prefix_with_unit_weights():
    share = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]])
    r = threshold_routing(share, 0.8)
    kept = {(t, e) for t, e in zip(r.token_idx.tolist(), r.expert_idx.tolist())}
    assert kept == {(0, 0), (0, 1), (1, 3), (1, 2), (1, 1), (2, 0)}
    assert torch.equal(r.weight, torch.ones(len(kept)))


def test_oracle_keeps_experts_with_most_activation_mass():
    model = tiny_bert()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    ffn = ConvertedFFN.from_dense(dense, split_neurons("random", dense, 4), mode="oracle")
    x = torch.randn(6, D)
    mass = ffn.expert_mass(x)
    ffn.set_threshold(1e-6)  # keep only the top expert
    ffn.record_kept = True
    y = ffn(x)
    assert torch.equal(ffn.last_kept, torch.ones(6, dtype=torch.long))
    top = mass.argmax(-1)
    want = (
        torch.stack(
            [
                ffn.experts(x[i : i + 1], torch.nn.functional.one_hot(top[i], 4), top[i : i + 1])[0]
                for i in range(6)
            ]
        )
        + ffn.out_bias
    )
    torch.testing.assert_close(y, want)


def test_learned_router_beats_the_input_independent_guess():
    model = tiny_bert()
    x = capture_ffn_inputs(model, random_batches())
    assert x[0].shape == (3 * (4 * 12 - 6), D)  # padding rows skipped
    convert_model(model, ConvertConfig(num_experts=4, router_steps=200, calib_tokens=500), inputs=x)
    for ffn, xi in zip(converted_ffns(model), x):
        q = ffn.oracle_share(xi)
        kl = lambda p, q=q: (q * (q.log() - p.log())).sum(-1).mean()
        prior = q.mean(0, keepdim=True).expand_as(q)  # best input-independent prediction
        with torch.no_grad():
            assert kl(ffn.router(xi).softmax(-1)) < 0.8 * kl(prior)


# ------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("method", ["coact", "params", "random"])
def test_split_methods_give_equal_size_partitions(method):
    model = tiny_llama()
    site = find_ffns(model)[0]
    dense = site.adapter.extract(site.owner)
    acts = dense.neuron_acts(torch.randn(100, D))
    groups = split_neurons(method, dense, 8, acts, seed=1)
    assert groups.shape == (8, D_FF // 8)
    assert sorted(groups.flatten().tolist()) == list(range(D_FF))


def test_params_split_groups_neurons_with_similar_input_weights():
    # Four directions, 8 neurons each (noisy copies): balanced k-means must recover them.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, D, generator=g)
    w1 = base.repeat_interleave(8, 0) + 0.01 * torch.randn(32, D, generator=g)
    w1 = w1[torch.randperm(32, generator=g)]
    dense = DenseFFN(w1, None, torch.randn(D, 32), None, torch.relu)
    groups = split_neurons("params", dense, 4, seed=0)
    for grp in groups:
        dirs = {int((base @ w1[j]).argmax()) for j in grp.tolist()}
        assert len(dirs) == 1, groups


# ------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    model, _, batches, manifest = converted("bert", experts=4, steps=20, threshold=0.7)
    before = hidden(model, batches[2])
    save_converted(model, tmp_path / "conv", manifest)
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    assert not list((tmp_path / "conv").glob("*.bin")) and not list(
        (tmp_path / "conv").glob("*.pt")
    )
    loaded, tok, m2 = load_converted(tmp_path / "conv")
    assert tok is None and m2 == manifest
    assert isinstance(loaded, transformers.BertModel)
    ffns = converted_ffns(loaded)
    assert [f.threshold for f in ffns] == [0.7, 0.7]
    torch.testing.assert_close(hidden(loaded, batches[2]), before, atol=0, rtol=0)
    set_threshold(loaded, 1.0)
    set_threshold(model, 1.0)
    torch.testing.assert_close(
        hidden(loaded, batches[2]), hidden(model, batches[2]), atol=0, rtol=0
    )


def test_load_rejects_a_directory_without_manifest(tmp_path):
    with pytest.raises(ValueError, match="xmoe_convert.json"):
        load_converted(tmp_path)


# ------------------------------------------------------------------------------ errors


def test_unsupported_architecture_names_the_model_class():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="unsupported architecture.*Weird"):
        convert_model(Weird(), ConvertConfig(num_experts=2), inputs=[])


def test_experts_must_divide_d_ff():
    with pytest.raises(ValueError, match=r"--experts\) = 5 does not divide .*d_ff=32"):
        convert_model(tiny_bert(), ConvertConfig(num_experts=5), random_batches())


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(split="kmeans"), "--split"),
        (dict(router="best"), "--router"),
        (dict(threshold=0.0), "threshold"),
        (dict(calib_tokens=0), "--calib-tokens"),
        (dict(num_experts=0), "--experts"),
    ],
)
def test_bad_config_values_name_the_argument(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        convert_model(tiny_bert(), ConvertConfig(**kw), random_batches())


def test_set_threshold_rejects_out_of_range():
    model, *_ = converted("gpt2")
    with pytest.raises(ValueError, match="threshold"):
        set_threshold(model, 1.5)
    with pytest.raises(ValueError, match="mode"):
        set_mode(model, "sparse")


def test_cli_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys):
    rc = main(
        [
            "convert",
            "--model",
            str(tmp_path / "missing"),
            "--experts",
            "4",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "--model" in capsys.readouterr().err
    rc = main(["convert", "--model", "minilm", "--experts", "7", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--experts" in capsys.readouterr().err
    rc = main(["convert-eval", str(tmp_path), "--thresholds", "0.5,2"])
    assert rc == 2
    assert "--thresholds" in capsys.readouterr().err


def test_calibration_batches_stop_at_the_token_budget_and_group_by_length():
    class Tok:  # a text's tokens = its words; pads to the longest text of the call
        def __call__(self, texts, **kw):
            single = isinstance(texts, str)
            texts = [texts] if single else texts
            n = max(len(t.split()) for t in texts)
            ids = torch.ones(len(texts), n, dtype=torch.long)
            mask = torch.tensor([[1] * len(t.split()) + [0] * (n - len(t.split())) for t in texts])
            if single:
                return {"input_ids": ids[0].tolist()}
            return {"input_ids": ids, "attention_mask": mask}

    texts = ["a " * k for k in (5, 1, 5, 1, 1, 1, 9, 9)]
    batches = calibration_batches(Tok(), texts, calib_tokens=14, batch_size=3)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 14  # stops after 6 texts
    assert [b["input_ids"].shape for b in batches] == [(3, 1), (3, 5)]  # grouped: no padding
    with pytest.raises(ValueError, match="calibration text has only"):
        calibration_batches(Tok(), texts[:3], calib_tokens=30)


def test_cli_convert_then_convert_eval_on_a_local_model(tmp_path, capsys):
    words = [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "that",
        "is",
        "it",
        "you",
        "my",
        "with",
        "not",
        "his",
        "be",
        "your",
        "for",
        "this",
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=D_FF,
        max_position_embeddings=160,
    )
    base_dir, out = tmp_path / "base", tmp_path / "conv"
    transformers.BertModel(cfg).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    argv = ["convert", "--model", str(base_dir), "--experts", "4", "--out", str(out)]
    argv += ["--calib-tokens", "300", "--router-steps", "5", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert "1 FFNs x 4 experts" in capsys.readouterr().out
    assert main(argv) == 2  # --out is not empty now
    assert "--overwrite" in capsys.readouterr().err
    argv = ["convert-eval", str(out), "--thresholds", "1.0,0.3", "--no-speed", "--no-progress"]
    argv += ["--shakespeare", "12", "--stdlib", "8", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("| 4 |")]
    assert len(lines) == 4  # learned and oracle at two thresholds
    full = [ln for ln in lines if "| 1 |" in ln]
    assert all("| 1.0000 |" in ln and "100.0%" in ln for ln in full)  # t = 1 is exact
    assert (out / "eval.json").is_file()


def test_distill_trains_only_the_expert_slices_and_improves_the_sparse_model():
    from xmoe.convert.finetune import distill

    model, dense_out, batches, _ = converted("bert", experts=4, steps=30)
    router_before = [f.router.weight.clone() for f in converted_ffns(model)]
    other_before = model.embeddings.word_embeddings.weight.clone()
    w1_before = converted_ffns(model)[0].experts.w1.clone()
    set_threshold(model, 0.5)
    err = lambda: float((hidden(model, batches[0]) - dense_out).pow(2).mean())
    before = err()
    info = distill(model, batches, threshold=0.5, steps=40, lr=3e-3)
    assert info["loss_last"] < info["loss_first"]
    assert err() < before  # closer to the dense model at the tuned threshold
    assert not torch.equal(converted_ffns(model)[0].experts.w1, w1_before)
    for f, w in zip(converted_ffns(model), router_before):
        assert torch.equal(f.router.weight, w)
    assert torch.equal(model.embeddings.word_embeddings.weight, other_before)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert [f.threshold for f in converted_ffns(model)] == [0.5, 0.5]
    with pytest.raises(ValueError, match="--finetune-steps"):
        distill(model, batches, threshold=0.5, steps=0)
