"""The batch-size sweeps: a tiny shapes sweep end to end, statistics, bad settings in one line."""

from __future__ import annotations

import json
import math

import pytest

from experiments import sweep_accuracy, sweep_digits
from experiments.common import reports


@pytest.mark.slow
def test_tiny_shapes_sweep_writes_every_output_with_per_seed_values(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--examples", "32", "--batch-sizes", "16", "--losses", "decoupled", "--seeds", "0,1",
            "--eval-examples", "64", "--no-progress", "--out", str(out)]  # fmt: skip
    assert sweep_accuracy.main(argv) == 0
    for ext in ("json", "md", "csv", "png"):
        assert (out / f"accuracy_sweep.{ext}").stat().st_size > 0
    # every run's workdir (checkpoints, metrics) inside the run directory
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "decoupled_b16_s0",
        "decoupled_b16_s1",
    ]

    record = json.loads((out / "accuracy_sweep.json").read_text())
    assert record["complete"] and record["runs_planned"] == 2
    protocol = record["protocol"]  # read back from the runs' configs
    assert any("32 examples per run" in rule for rule in protocol["rules"])
    assert protocol["fixed"]["--dataset"] == "shapes" and protocol["fixed"]["--loss"] == "decoupled"
    assert protocol["fixed"]["--steps"] == 2 and protocol["varied"] == ["--seed"]
    runs = record["runs"]
    assert [(r["loss"], r["batch_size"], r["seed"]) for r in runs] == [
        ("decoupled", 16, 0),
        ("decoupled", 16, 1),
    ]
    for r in runs:  # the schedule of the protocol: 32 // 16 steps, sqrt(16 / 256) * 2e-3
        assert (r["examples"], r["steps"], r["warmup_steps"]) == (32, 2, 0)
        assert r["learning_rate"] == pytest.approx(2e-3 * math.sqrt(16 / 256))
        for m in sweep_accuracy.METRICS:
            assert 0.0 <= r[m] <= 1.0
    (point,) = record["points"]
    assert point["seeds"] == [0, 1] and point["steps"] == 2
    for m in sweep_accuracy.METRICS:  # per-seed values, and their statistics
        values = [r[m] for r in runs]
        assert point[m]["values"] == values
        assert point[m]["mean"] == pytest.approx(sum(values) / 2)
        assert point[m]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert len(record["untrained"][m]["values"]) == 2

    printed = capsys.readouterr().out
    assert "| 16 | 0.08 | 2 | 0.0005 |" in printed  # hard negatives, steps, peak LR
    assert f"run directory: {out}" in printed


@pytest.mark.parametrize(
    "module, argv, start",
    [
        (sweep_accuracy, ["--losses", "infonce,hinge"], "error: unknown --loss 'hinge'"),
        (sweep_accuracy, ["--examples", "100", "--batch-sizes", "32,256"],
         "error: --examples 100 is smaller than --batch-sizes [256]"),
        (sweep_accuracy, ["--seeds", "0,0"], "error: --seeds [0, 0] repeats a value"),
        (sweep_accuracy, ["--batch-sizes", "32,x"], "error: argument --batch-sizes"),
        (sweep_accuracy, ["--batch-sizes", "1"], "error: --batch-size must be at least 2"),
        (sweep_digits, ["--epochs", "0"], "error: --epochs must be positive"),
        (sweep_digits, ["--losses", "hinge"], "error: unknown --loss 'hinge'"),
    ],
)  # fmt: skip
def test_bad_sweep_setting_is_one_line_before_anything_runs(module, argv, start, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = module.main([*argv, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors (one line too: OneLineParser)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written


def test_statistics_are_sample_std_min_max():
    s = reports.statistics([0.2, 0.4, 0.9])
    assert s["mean"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 2))
    assert (s["min"], s["max"], s["values"]) == (0.2, 0.9, [0.2, 0.4, 0.9])
    assert reports.statistics([0.3])["std"] == 0.0


def test_a_diverged_run_is_kept_and_left_out_of_the_statistics():
    runs = [(0, 0.2, None), (1, None, "step 3: loss = nan"), (2, 0.4, None)]
    rows = [{"loss": "sigmoid", "batch_size": 8192, "seed": s, "acc": a, "error": e}
            for s, a, e in runs]  # fmt: skip
    (point,) = reports.summarise(rows, ["acc"])
    assert point["failed_seeds"] == [1] and point["acc"]["values"] == [0.2, None, 0.4]
    assert point["acc"]["mean"] == pytest.approx(0.3)
    assert reports.table_cell(point, "acc") == "30.0 ± 14.1 (1 of 3 diverged)"
    rows = [dict(r, acc=None, error="nan") for r in rows]
    assert reports.table_cell(reports.summarise(rows, ["acc"])[0], "acc") == "diverged"
