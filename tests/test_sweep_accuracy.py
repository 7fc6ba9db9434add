"""Smoke test of the accuracy sweep script: tiny sizes, every output file written."""

from __future__ import annotations

import json

import pytest

from contrastive.data import prepare_digits
from experiments import sweep_accuracy


@pytest.mark.slow
def test_sweep_writes_table_plot_and_data(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    prepare_digits(data_dir)
    out = tmp_path / "results"
    argv = ["--data-dir", str(data_dir), "--losses", "infonce,sigmoid", "--batch-sizes", "16",
            "--epochs", "0.05", "--model", "mlp", "--width", "16", "--eval-examples", "100",
            "--out", str(out)]  # fmt: skip
    assert sweep_accuracy.main(argv) == 0
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"accuracy_sweep.{ext}").stat().st_size > 0
    summary = json.loads((out / "accuracy_sweep.json").read_text())
    assert [(r["loss"], r["batch_size"]) for r in summary["runs"]] == [
        ("infonce", 16),
        ("sigmoid", 16),
    ]
    assert 0.0 <= summary["random_encoder"]["linear_probe"] <= 1.0
    printed = capsys.readouterr().out
    assert "| 16 |" in printed and "random encoder" in printed


def test_bad_sweep_configuration_is_one_line(tmp_path, capsys):
    argv = ["--losses", "infonce,hinge", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    assert sweep_accuracy.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --loss 'hinge'") and len(err.splitlines()) == 1
