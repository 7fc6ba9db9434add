"""The batch-size study trained for real at a toy size: pilot, targets, tuning, seeds, report;
then the main job trains the seed runs again at that study's rates and finds them equal."""

from __future__ import annotations

import json

import pytest

from experiments import batch_size_study
from experiments.study import protocol as P


@pytest.mark.slow
def test_a_toy_study_then_the_main_job_reproduces_it(tmp_path, capsys):
    cache = str(tmp_path / "features")
    toy = ["--losses", "infonce", "--batch-sizes", "32,128", "--train-examples", "1024",
           "--feature-cache", cache, "--compile-cache", str(tmp_path / "xla")]  # fmt: skip
    tuned = tmp_path / "tuned"
    argv = ["--tune", *toy, "--pilot-steps", "40", "--rate-exponents=0,1", "--seeds", "1,2",
            "--out", str(tuned)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    study = json.loads((tuned / "batch_size_study.json").read_text())
    harder = min(study["targets"]["targets"])
    rows = {r["name"]: r for r in study["rows"]}
    for c in study["targets"]["plateaus"]:  # every cell clears the harder target with margin
        assert c["plateau"] + P.MARGIN_SD * c["noise_sd"] <= harder + 1e-9
    for name, r in rows.items():
        # the curve is the validation cross-entropy, and steps to target its first crossing
        assert [s for s, _ in r["curve"]] == [s for s, _ in r["curves"][P.METRIC]]
        for t, s in r["steps_to"].items():
            first = next((st for st, v in r["curve"] if v <= float(t)), None)
            assert s == first, name
        assert not (tuned / "runs" / name / "checkpoints").exists()  # deleted once the row is
    for p in study["summary"]:
        assert p["seeds"] == [1, 2] and p["exponent"] in p["grid"]
    assert (tuned / "batch_size_study.png").stat().st_size > 0
    capsys.readouterr()

    main_out = tmp_path / "main"
    argv = [*toy, "--rates", str(tuned / "batch_size_study.json"), "--out", str(main_out)]
    assert batch_size_study.main(argv) == 0
    again = json.loads((main_out / "batch_size_study_main.json").read_text())
    assert again["target"] == harder
    for c in again["comparison"]:  # one machine, one stack: the same steps, seed by seed
        assert c["now"] == c["committed"] and c["z"] == 0.0
    out = capsys.readouterr().out
    assert "**Reproduces within noise:** all 2 cells." in out
    assert f"run directory: {main_out}" in out
