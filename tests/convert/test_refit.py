"""Least-squares refit of the second layers (convert/refit.py) and the capture it runs on."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import converted, hidden, random_batches, tiny_bert  # noqa: E402

from xmoe.convert import convert_model, set_mode, set_threshold  # noqa: E402
from xmoe.convert.adapters import find_ffns  # noqa: E402
from xmoe.convert.calibrate import capture_ffn_inputs, capture_input  # noqa: E402
from xmoe.convert.convert import ConvertConfig, converted_ffns  # noqa: E402
from xmoe.convert.pipeline import reference_rows  # noqa: E402
from xmoe.convert.refit import refit_second_layers, solve_second_layer  # noqa: E402


def test_solve_matches_brute_force_ridge_least_squares():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(200, 7, generator=g), torch.randn(200, 3, generator=g)
    w_old, b_old = torch.randn(7, 3, generator=g), torch.randn(3, generator=g)
    ridge = 0.1
    w, b = solve_second_layer(a, t, w_old, b_old, ridge)
    # brute force: augmented least squares with the penalty as extra rows
    lam = ridge * float((a * a).sum(0).mean())
    big_a = torch.cat(
        [
            torch.cat([a, torch.ones(200, 1)], 1),
            torch.cat([lam**0.5 * torch.eye(7), torch.zeros(7, 1)], 1),
        ]
    ).double()
    big_t = torch.cat([t, lam**0.5 * w_old]).double()
    sol = torch.linalg.lstsq(big_a, big_t).solution.float()
    torch.testing.assert_close(w, sol[:7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, sol[7], atol=1e-4, rtol=1e-4)


def test_solve_without_bias_and_huge_ridge_keeps_old_weights():
    g = torch.Generator().manual_seed(1)
    a, t = torch.randn(50, 4, generator=g), torch.randn(50, 2, generator=g)
    w_old = torch.randn(4, 2, generator=g)
    w, b = solve_second_layer(a, t, w_old, None, 1e9)
    assert b is None
    torch.testing.assert_close(w, w_old, atol=1e-5, rtol=1e-5)
    # tiny ridge: the plain least-squares solution
    w, _ = solve_second_layer(a, t, w_old, None, 1e-12)
    torch.testing.assert_close(w, torch.linalg.lstsq(a, t).solution, atol=1e-4, rtol=1e-4)


def test_capture_input_matches_the_full_capture():
    model = tiny_bert()
    batches = random_batches()
    full = capture_ffn_inputs(model, batches)
    for site, ref in zip(find_ffns(model), full, strict=True):
        x = capture_input(model, site.adapter.entry(site.owner), batches)
        torch.testing.assert_close(x, ref)


def test_dense_refit_against_own_outputs_changes_nothing():
    model, _, batches, _ = converted("bert")
    set_mode(model, "dense")
    ffns = converted_ffns(model)
    xs = [capture_input(model, f, batches) for f in ffns]
    ys = [f(x) for f, x in zip(ffns, xs, strict=True)]
    before = hidden(model, batches[0])
    info = refit_second_layers(model, batches, xs, ys, ridge=1e-6)
    assert max(info["rel_error_after"]) < 1e-3
    torch.testing.assert_close(hidden(model, batches[0]), before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("residual", [False, True])
def test_sparse_refit_lowers_each_layers_error_and_the_output_error(residual):
    torch.manual_seed(0)
    base = tiny_bert()
    batches = random_batches(n_batches=6, batch=8, seq=16)
    ref = reference_rows(base, batches)
    model = copy.deepcopy(base)
    convert_model(model, ConvertConfig(num_experts=4, calib_tokens=400, router_steps=30), batches)
    set_threshold(model, 0.5)
    out = hidden(base, batches[0])
    err_before = float((hidden(model, batches[0]) - out).norm())
    info = refit_second_layers(model, batches, ref["inputs"], ref["outputs"], 1e-3, residual)
    for b, a in zip(info["rel_error_before"], info["rel_error_after"], strict=True):
        assert a <= b + 1e-6
    assert float((hidden(model, batches[0]) - out).norm()) < err_before


def test_refit_checks_its_arguments():
    model, _, batches, _ = converted("bert")
    with pytest.raises(ValueError, match="ridge"):
        refit_second_layers(model, batches, [], [], ridge=0.0)
    with pytest.raises(ValueError, match="model has 2"):
        refit_second_layers(model, batches, [torch.zeros(1, 16)], [torch.zeros(1, 16)])
