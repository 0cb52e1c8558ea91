"""`xmoe convert` and `xmoe convert-eval` end to end (cli/convert.py -> convert/pipeline.py,
convert/convert_eval.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hf_tiny import save_local_bert  # noqa: E402

from xmoe.cli import main  # noqa: E402


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


def test_cli_convert_then_convert_eval_on_a_local_model(tmp_path, capsys):
    base_dir, out = save_local_bert(tmp_path / "base"), tmp_path / "conv"
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
