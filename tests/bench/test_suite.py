"""``xmoe bench``: every variant computes the same function; specs and ratios behave."""

from __future__ import annotations

import json

import pytest
import torch

from xmoe.bench.problem import ProblemSpec, build_problem, parse_router
from xmoe.bench.variants import build_variants

SPEC = dict(num_tokens=96, d_model=16, num_experts=8, d_expert=8)


def _run(variant, grad):
    for p in variant.params:
        p.grad = None
    out = variant.run()
    out.backward(grad.to(out.dtype))
    return out.detach().float(), variant.params[0].grad.float()


@pytest.mark.parametrize("router", ["top2", "t0.7", "t0.9@1.5"])
def test_every_variant_matches_the_loop_in_output_and_input_gradient(router):
    problem = build_problem(ProblemSpec(router=router, **SPEC))
    variants = build_variants(problem, torch.float32)
    grad = torch.randn(SPEC["num_tokens"], SPEC["d_model"])
    ref_out, ref_gx = _run(variants["loop"], grad)
    assert ref_out.abs().sum() > 0 and ref_gx.abs().sum() > 0
    expected = {
        "loop",
        "capacity",
        "dense",
        "xmoe",
        "xmoe[segment]",
        "xmoe[grouped_mm]",
        "xmoe[loop]",
    }
    assert expected <= set(variants)
    for name, variant in variants.items():
        if name in ("dense", "capacity"):
            continue  # other weights (dense) / capacity drops: not the same function
        out, gx = _run(variant, grad)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5, msg=name)


def test_capacity_variant_matches_when_nothing_is_dropped():
    problem = build_problem(ProblemSpec(router="top2", **SPEC))
    variants = build_variants(problem, torch.float32, capacity_factor=float(SPEC["num_experts"]))
    grad = torch.randn(SPEC["num_tokens"], SPEC["d_model"])
    assert "dropped 0.0%" in variants["capacity"].note
    ref_out, ref_gx = _run(variants["loop"], grad)
    out, gx = _run(variants["capacity"], grad)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5)


def test_hf_experts_run_the_same_weights_when_transformers_is_installed():
    pytest.importorskip("transformers")
    problem = build_problem(ProblemSpec(router="top2", **SPEC))
    variants = build_variants(problem, torch.float32)
    grad = torch.randn(SPEC["num_tokens"], SPEC["d_model"])
    ref_out, ref_gx = _run(variants["loop"], grad)
    for impl in ("hf_grouped_mm", "hf_batched_mm", "hf_eager"):
        out, gx = _run(variants[impl], grad)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=impl)
        torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5, msg=impl)


def test_hf_variants_are_skipped_for_variable_k_routing():
    problem = build_problem(ProblemSpec(router="t0.7", **SPEC))
    assert not any(n.startswith("hf_") for n in build_variants(problem, torch.float32))


def test_dense_variant_has_the_equal_flop_width():
    problem = build_problem(ProblemSpec(router="t0.9@1.5", **SPEC))
    dense = build_variants(problem, torch.float32, names=["dense"])["dense"]
    width = round(problem.experts_per_token * SPEC["d_expert"])
    assert dense.note == f"width {width}"
    assert abs(problem.experts_per_token - 1.5) < 0.1


@pytest.mark.parametrize("bad", ["top", "topx", "t0", "t1.5", "t0.9@0.5", "x", "t0.9@abc"])
def test_bad_router_spec_names_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="router spec"):
        parse_router(bad)


def test_token_slices_partition_the_routing_and_keep_its_rate():
    from xmoe.bench.problem import token_slices

    problem = build_problem(ProblemSpec(router="t0.9@1.5", **SPEC))
    slices = token_slices(problem, 8, 12)
    assert sum(s.routing.num_pairs for s in slices) == problem.routing.num_pairs
    for i, s in enumerate(slices):
        assert s.routing.num_tokens == 8 and s.x.shape == (8, SPEC["d_model"])
        assert int(s.routing.token_idx.min()) >= 0 and int(s.routing.token_idx.max()) < 8
        torch.testing.assert_close(s.x, problem.x[8 * i : 8 * (i + 1)])
    with pytest.raises(ValueError, match="slices of 8 tokens need 104"):
        token_slices(problem, 8, 13)


def test_decode_slices_compute_what_the_full_batch_computes():
    from xmoe.bench.problem import token_slices

    problem = build_problem(ProblemSpec(router="t0.9@1.5", **SPEC))
    variants = build_variants(problem, torch.float32, names=["loop", "xmoe"])
    full = variants["xmoe"].run().detach()
    inputs = variants["xmoe"].inputs
    for i, piece in enumerate(token_slices(problem, 4, 24)):
        inputs.use(piece, torch.float32)
        for name in ("loop", "xmoe"):
            out = variants[name].run().detach()
            torch.testing.assert_close(out, full[4 * i : 4 * (i + 1)], atol=1e-5, rtol=1e-5)


def test_memory_probe_grows_with_the_kept_pairs():
    from xmoe.bench.memory import peak_bytes

    spec = dict(d_model=64, num_experts=8, d_expert=64, router="top2")
    small = peak_bytes(ProblemSpec(num_tokens=2048, **spec), 1.0, "xmoe[segment]", "fp32")
    large = peak_bytes(ProblemSpec(num_tokens=8192, **spec), 1.0, "xmoe[segment]", "fp32")
    # Activations and their gradients: about (d + 3h) fp32 values per pair, 4x the pairs.
    assert small > 0 and large > 2 * small


def test_suite_writes_json_with_medians_and_the_headline_ratios(tmp_path):
    from xmoe.bench.suite import TARGETS, Job, run_suite

    top2 = ProblemSpec(router="top2", **SPEC)
    thr = ProblemSpec(router="t0.9@1.5", **SPEC)
    decode = [
        Job(
            ProblemSpec(**{**SPEC, "num_tokens": n, "router": router}),
            dtypes=("fp32",),
            passes=("fwd",),
            variants=("dense", "xmoe", "hf_grouped_mm"),
            reps=2,
            tags=("decode",),
            cycle=4,
            calibrate_tokens=SPEC["num_tokens"],
        )
        for n in (1, 8)
        for router in ("top2", "t0.9@1.5")
    ]
    jobs = [
        Job(top2, reps=2),
        Job(thr, reps=2, variants=("dense", "xmoe", "capacity")),
        Job(top2, dtypes=("bf16",), reps=1, variants=("dense", "xmoe", "hf_grouped_mm")),
        Job(thr, dtypes=("bf16",), reps=1, passes=("fwd+bwd",), variants=("dense", "xmoe")),
        *decode,
    ]
    result = run_suite(
        True,
        tmp_path,
        progress=False,
        command="test",
        jobs=jobs,
        memory_probes=[(top2, "xmoe")],
        target=(top2, thr),
    )
    data = json.loads(next(tmp_path.glob("bench-quick-*.json")).read_text())
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["threads"] >= 1
    assert set(TARGETS) <= set(data["ratios"])
    assert all(v > 0 for v in data["ratios"].values())
    assert data["met"].keys() == TARGETS.keys()
    keys = {(r["variant"], r["config"], r["dtype"], r["pass_"]) for r in data["results"]}
    assert ("xmoe", top2.key, "fp32", "fwd+bwd") in keys
    assert ("loop", top2.key, "fp32", "fwd") in keys
    assert all(r["median_ms"] > 0 for r in data["results"])
    assert all(len(r["times_ms"]) == (1 if r["dtype"] == "bf16" else 2) for r in data["results"])
    assert data["memory"][0]["variant"] == "xmoe" and data["memory"][0]["peak_mib"] > 0
    decode_rows = [r for r in data["results"] if "decode" in r["tags"]]
    assert {r["spec"]["num_tokens"] for r in decode_rows} == {1, 8}
    assert {"fp32 fwd", "fp32 fwd+bwd"} <= set(data["gflops"])
    assert data["meta"]["cpu_flags"] == sorted(data["meta"]["cpu_flags"])
    assert "threshold_vs_top2" in next(tmp_path.glob("*.md")).read_text()
    assert result["files"][0].endswith(".json")
