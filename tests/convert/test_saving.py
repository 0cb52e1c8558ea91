"""Saving and loading converted models (convert/saving.py): safetensors, strict keys."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import (  # noqa: E402
    converted,
    hidden,
)

from xmoe.convert import (  # noqa: E402
    converted_ffns,
    load_converted,
    save_converted,
    set_threshold,
)


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
