"""The batch-size study trained for real at a toy size: pilot, targets, tuning, seeds, report;
then the main job trains the seed runs again at that study's rates and finds them equal."""

from __future__ import annotations

import json

import pytest

from experiments import batch_size_study
from experiments.study import protocol as P
from experiments.study.noise_scale import schedule


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
        assert c["now"] == c["committed"] and c["z"] == 0.0 and c["identical"]
    out = capsys.readouterr().out
    assert "**Reproduces within noise:** all 2 cells." in out
    assert f"run directory: {main_out}" in out

    # The noise stage on the same toy study: the committed rates, three checkpoints a run,
    # seeds pooled before dividing.
    noise_out = tmp_path / "noise"
    argv = ["--noise-scale", *toy, "--rates", str(tuned / "batch_size_study.json"),
            "--out", str(noise_out)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    noise = json.loads((noise_out / "batch_size_study_noise.json").read_text())
    chosen = {p["batch_size"]: p for p in study["summary"] if p["target"] == harder}
    for r in noise["rows"]:
        p = chosen[r["batch_size"]]
        assert r["learning_rate"] == p["learning_rate"] and r["seed"] in (1, 2)
        k, steps = schedule(p.get("geomean") or p["lower_bound"])
        assert r["cap"] == steps and [m["step"] for m in r["noise"]] == [k, 2 * k, 3 * k]
        for m in r["noise"]:
            assert m["g2"] != 0 and m["b_simple"] == pytest.approx(m["trace"] / m["g2"])
    for x in noise["summary"]:
        mine = [r for r in noise["rows"] if r["batch_size"] == x["batch_size"]]
        got = [m for r in mine for m in r["noise"] if m["step"] == x["step"]]
        trace = sum(m["trace"] for m in got) / len(got)
        g2 = sum(m["g2"] for m in got) / len(got)
        assert x["trace"] == pytest.approx(trace) and x["g2"] == pytest.approx(g2)
        # divided once, after pooling; no ratio where the pooled |G|^2 is not positive
        assert x["b_simple"] == (pytest.approx(trace / g2) if g2 > 0 else None)
    assert {v["answer"] for v in noise["verdicts"]} <= {
        "within 2x", "not within 2x", "not resolved at this precision"}  # fmt: skip
    assert "## The gradient noise scale beside the critical batch size" in capsys.readouterr().out

    # The small-batches stage on the same toy study: InfoNCE and SogCLR at B = 32, InfoNCE's
    # large batch 128; SogCLR's rate tuned on seed 0, seed 1 at a budget of 2,048 examples
    # (one seed and two arms: the arithmetic over seeds and every arm's config are
    # test_study_small_batches.py's).
    small_out = tmp_path / "small"
    argv = ["--small-batches", *toy, "--rates", str(tuned / "batch_size_study.json"),
            "--small-batch-arms", "infonce,sogclr",
            "--rate-exponents=0,1", "--seeds", "1", "--budget-examples", "2048",
            "--out", str(small_out)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    small = json.loads((small_out / "batch_size_study_small_batches.json").read_text())
    assert small["batch_sizes"] == [32] and small["large_batch"] == 128
    rates = {(r["arm"], r["batch_size"]): r for r in small["rates"]}
    assert rates[("infonce", 32)]["learning_rate"] == chosen[32]["learning_rate"]
    assert rates[("infonce", 128)]["learning_rate"] == chosen[128]["learning_rate"]
    r = rates[("sogclr", 32)]  # tuned on seed 0 by the study's rule
    assert r["from"] == "tuned" and r["exponent"] in r["grid"]
    assert r["learning_rate"] == pytest.approx(P.rate(32, r["exponent"]))
    assert {t["seed"] for t in small["tuning"]} == {P.TUNING_SEED}
    assert {r["seed"] for r in small["rows"]} == {1}  # the tuning seed is in no mean
    for r in small["rows"]:
        assert r["cap"] == 2048 // r["batch_size"] and r["final_step"] == r["cap"]
        assert r["loss"] == ("global-infonce" if "sogclr" in r["arm"] else "infonce")
    for p in small["summary"]:
        mine = sorted((r for r in small["rows"] if (r["arm"], r["batch_size"]) ==
                       (p["arm"], p["batch_size"])), key=lambda r: r["seed"])  # fmt: skip
        acc = [r["zero_shot_top1"] for r in mine]
        assert p["accuracy"]["mean"] == pytest.approx(sum(acc) / len(acc))
        for t, st in p["steps"].items():
            each = [max(1, r["steps_to"][t] - P.WARMUP_STEPS) if r["steps_to"][t] else None
                    for r in mine]  # fmt: skip
            assert st["values"] == each
            if st.get("geomean") is not None:
                assert st["examples"] == pytest.approx(st["geomean"] * p["batch_size"])
    assert {v["answer"] for v in small["verdicts"]} <= {"better", "worse", "not resolved"}
    assert "Small batch does not harm performance" in capsys.readouterr().out

    # The adaptive-batch stage on the same toy study: from B = 32 up to 128, both factors.
    adaptive_out = tmp_path / "adaptive"
    argv = ["--adaptive-batch", *toy, "--rates", str(tuned / "batch_size_study.json"),
            "--seeds", "1", "--out", str(adaptive_out)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    adaptive = json.loads((adaptive_out / "batch_size_study_adaptive.json").read_text())
    assert adaptive["start_batch"] == 32 and adaptive["max_batch"] == 128
    assert {(r["factor"], r["seed"]) for r in adaptive["rows"]} == {
        (f, 1) for f in (1.0, 0.125)}  # fmt: skip
    for r in adaptive["rows"]:
        assert r["learning_rate"] == chosen[32]["learning_rate"]
        sizes = [b for _, b, _ in r["batch_path"]]
        assert sizes[0] == 32 and max(sizes) <= 128 and sizes == sorted(sizes)
        for s, b, e in r["batch_path"]:  # every step trained at 32 .. 128 pairs
            assert 32 * s <= e <= 128 * s and (b > 32 or e == 32 * s)
        assert [m[0] for m in r["meter"]] == list(range(10, 10 * len(r["meter"]) + 1, 10))
    assert "## An adaptive batch size against fixed ones" in capsys.readouterr().out
