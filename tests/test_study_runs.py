"""What the batch-size study asks of the loop: a locked image tower, a validation split carved
from train, evaluation on a geometric schedule, stopping at a target, the noise-scale meter;
and the study's own arithmetic (first crossing, McCandlish's fit, the learning-rate choice)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contrastive import loop
from contrastive.configs import ConfigError, parse_config
from contrastive.loop import geometric_steps
from experiments import batch_size_study, train
from experiments.common.scaling import first_crossing, fit_critical_batch, model_steps
from experiments.common.study import choose_rates

# A locked-tower run on shapes: 2,048 training examples, 256 for validation, batch 64.
LOCKED = [
    "--dataset", "shapes", "--locked-image", "pretrained", "--text-tower", "bag-of-words",
    "--train-examples", "2048", "--validation-examples", "256", "--eval-examples", "256",
    "--batch-size", "64", "--learning-rate", "4e-3", "--warmup-steps", "2",
    "--end-lr-ratio", "1", "--no-progress", "--log-every", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One feature cache for the module: the locked tower is pre-trained once."""
    return str(tmp_path_factory.mktemp("features"))


def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_locked_run_stops_at_its_target_and_stays_finished(tmp_path, cache):
    argv = ["--workdir", str(tmp_path), *LOCKED, "--feature-cache", cache, "--steps", "400",
            "--eval-growth", "1.2", "--stop-at", "val_zero_shot_top1=0.05"]  # fmt: skip
    records = loop.train(parse_config(argv))
    evals = [r for r in records if "val_zero_shot_top1" in r]
    steps = [r["step"] for r in evals]
    # evaluated exactly on the geometric schedule until the target, then stopped there
    assert steps == sorted(s for s in geometric_steps(1.2, 400) if s <= steps[-1])
    assert steps[-1] < 400 and records[-1]["reached_target"] == "val_zero_shot_top1>=0.05"
    assert evals[-1]["val_zero_shot_top1"] >= 0.05
    assert all(r["val_zero_shot_top1"] < 0.05 for r in evals[:-1])
    # the stop is a full evaluation (test metrics too); the checks before it are quick
    assert "zero_shot_top1" in records[-1] and "zero_shot_top1" not in evals[0]
    # the same command again: the run is finished, nothing is trained or logged twice
    again = loop.train(parse_config(argv))
    assert [r["step"] for r in again] == [r["step"] for r in records]
    assert len(_records(tmp_path)) == len(records)


@pytest.mark.slow
def test_noise_scale_meter_logs_and_resumes_its_average(tmp_path, cache):
    base = ["--workdir", str(tmp_path), *LOCKED, "--feature-cache", cache, "--steps", "8",
            "--noise-scale-every", "2", "--checkpoint-every", "4"]  # fmt: skip
    loop.train(parse_config([*base, "--stop-after", "4"]))
    records = loop.train(parse_config(base))  # resumed at step 4
    noise = [r for r in records if "noise_b_simple" in r]
    assert [r["step"] for r in noise] == [2, 4, 6, 8]
    for r in noise:
        # each device's rows alone (8 devices) against the whole batch
        b, big = r["noise_b_small"], 64
        assert b == 64 // 8 and math.isfinite(r["noise_g2"]) and math.isfinite(r["noise_trace"])
    est = [
        (
            (big * r["noise_sq_big"] - b * r["noise_sq_small"]) / (big - b),
            (r["noise_sq_small"] - r["noise_sq_big"]) / (1 / b - 1 / big),
        )
        for r in noise
    ]
    g2_mean = np.mean([e[0] for e in est])
    trace_mean = np.mean([e[1] for e in est])
    np.testing.assert_allclose(noise[-1]["noise_g2"], g2_mean, rtol=1e-4)
    np.testing.assert_allclose(noise[-1]["noise_trace"], trace_mean, rtol=1e-4)
    np.testing.assert_allclose(noise[-1]["noise_b_simple"], trace_mean / g2_mean, rtol=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stop-at", "val_zero_shot_top1"], "--stop-at 'val_zero_shot_top1': give METRIC=VALUE"),
        (["--stop-at", "val_top9=0.5"], "--stop-at: unknown metric 'val_top9'"),
        (["--eval-growth", "1.0"], "--eval-growth must be above 1"),
        (["--dataset", "digits", "--validation-examples", "10", "--locked-image", "none"],
         "--validation-examples needs a data set whose validation metric"),
        (["--dataset", "digits", "--validation-examples", "0"], "--locked-image needs an image"),
        (["--train-examples", "999999", "--validation-examples", "4096"],
         "--train-examples 999999 plus --validation-examples 4096 exceed"),
    ],
)  # fmt: skip
def test_bad_study_settings_are_one_line(flags, message, tmp_path, capsys, cache):
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--feature-cache", cache, *flags]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_locked_features_of_a_user_are_checked_against_the_data_set(tmp_path, capsys):
    (tmp_path / "feats").mkdir()
    np.save(tmp_path / "feats" / "train.npy", np.zeros((100, 8), np.float32))
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--locked-image", str(tmp_path / "feats")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "train.npy has 100 rows but" in err and len(err.splitlines()) == 1, err


def test_geometric_steps_are_fixed_by_the_growth_alone():
    assert sorted(geometric_steps(2.0, 20)) == [1, 2, 4, 8, 16]
    assert geometric_steps(0.0, 20) == frozenset()
    assert sorted(geometric_steps(1.05, 30))[:12] == list(range(1, 13))


def test_first_crossing():
    assert first_crossing([1, 5, 9], [0.1, 0.3, 0.2], 0.3) == 5
    assert first_crossing([1, 5, 9], [0.1, 0.2, 0.2], 0.3) is None


@given(
    s_min=st.floats(10, 1e4),
    b_noise=st.floats(8, 1e5),
    sizes=st.lists(st.integers(2, 2**20), min_size=2, max_size=8, unique=True),
)
def test_fit_recovers_the_model_it_was_given(s_min, b_noise, sizes):
    steps = [s_min * (1 + b_noise / b) for b in sizes]
    fit = fit_critical_batch(sizes, steps)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-6)
    assert fit["b_crit"] == pytest.approx(b_noise, rel=1e-6)
    for b, s in zip(sizes, steps, strict=True):
        assert model_steps(fit, b) == pytest.approx(s, rel=1e-6)


def test_fit_refuses_too_few_points_and_reports_a_failed_fit():
    with pytest.raises(ValueError, match="two batch sizes or more"):
        fit_critical_batch([64, 128], [100, None])
    rising = fit_critical_batch([64, 128, 256], [10, 20, 40])  # no perfect-scaling regime
    assert rising["b_crit"] is None and math.isnan(model_steps(rising, 64))


def test_learning_rate_choice_takes_the_fewest_steps_per_target():
    rows = [
        {"stage": "tune", "loss": "infonce", "batch_size": 64, "learning_rate": lr,
         "steps_to": {"0.2": s2, "0.3": s3}}
        for lr, s2, s3 in [(1e-3, 50, None), (2e-3, 40, 400), (4e-3, 40, 300)]
    ]  # fmt: skip
    rates = choose_rates(rows, [0.2, 0.3])
    assert rates[("infonce", 64, 0.2)] == 2e-3  # a tie goes to the smaller rate
    assert rates[("infonce", 64, 0.3)] == 4e-3
    rows[1]["steps_to"]["0.3"] = rows[2]["steps_to"]["0.3"] = None
    assert choose_rates(rows, [0.3])[("infonce", 64, 0.3)] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--targets", "0.2,1.5"], "--targets '0.2,1.5': every value must be in (0, 1]"),
        (["--lr-factors", "1,-2"], "--lr-factors '1,-2': every value must be positive"),
        (["--lr-factors", "1"], "--lr-factors: tuning needs at least two"),
        (["--metric", "val_top9"], "--metric: unknown metric 'val_top9'"),
        (["--batch-sizes", "64,999999"], "--batch-sizes up to 999999 exceed"),
        (["--losses", "hinge"], "unknown loss 'hinge'"),
    ],
)  # fmt: skip
def test_bad_study_flags_are_one_line_before_any_run(flags, message, tmp_path, capsys):
    assert batch_size_study.main([*flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
def test_negative_queue_run_resumes_exactly(tmp_path, cache):
    """The queue is part of the checkpoint: a run killed after step 4 and resumed logs the
    uninterrupted run's losses; a queue longer than an epoch is refused in one line."""
    base = [*LOCKED, "--feature-cache", cache, "--steps", "8", "--log-every", "1",
            "--checkpoint-every", "4", "--skip-duplicate-negatives"]  # fmt: skip
    queue = ["--negative-queue", "2"]
    whole = loop.train(parse_config(["--workdir", str(tmp_path / "a"), *base, *queue]))
    cut = ["--workdir", str(tmp_path / "b"), *base, *queue]
    loop.train(parse_config([*cut, "--stop-after", "6"]))  # killed after step 6: resumes at 4
    resumed = loop.train(parse_config(cut))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert len({r["loss"] for r in whole}) == len(whole)  # the queue changes every step
    with pytest.raises(ConfigError, match="--negative-queue 40 spans more than an epoch"):
        loop.train(
            parse_config(["--workdir", str(tmp_path / "c"), *base, "--negative-queue", "40"])
        )


@pytest.mark.slow
def test_tiny_study_tunes_then_the_main_job_reruns_its_rates(tmp_path, cache, capsys):
    """The whole study at a toy size: tuning picks a rate per (loss, B, target) from the
    steps to target on validation, the seeds run at it, the fit and the plot are written;
    then the main job runs every seed at the rates that study chose."""
    common = ["--losses", "infonce", "--batch-sizes", "64,128", "--seeds", "0,1",
              "--train-examples", "2048", "--validation-examples", "256",
              "--first-cap", "60", "--min-cap", "20", "--feature-cache", cache,
              "--noise-scale-every", "5"]  # fmt: skip
    tuned = tmp_path / "tuned"
    argv = [*common, "--tune", "--lr-factors", "1,2", "--targets", "0.02,0.04", "--out", str(tuned)]
    assert batch_size_study.main(argv) == 0
    study = json.loads((tuned / "batch_size_study.json").read_text())
    assert (tuned / "batch_size_study.png").stat().st_size > 0
    tune = [r for r in study["rows"] if r["stage"] == "tune"]
    assert sorted((r["batch_size"], r["learning_rate"]) for r in tune) == sorted(
        (b, f * 4e-3 * math.sqrt(b / 256)) for b in (64, 128) for f in (1, 2)
    )
    for p in study["summary"]:  # the chosen rate is the tuning run with the fewest steps
        runs = [r for r in tune if r["batch_size"] == p["batch_size"]]
        steps = {r["learning_rate"]: r["steps_to"][str(p["target"])] for r in runs}
        reached = {lr: s for lr, s in steps.items() if s is not None}
        if reached:
            assert p["learning_rate"] == min(reached, key=lambda lr: (reached[lr], lr))
            assert p["seeds"] == [0, 1] and p["steps"][0] == reached[p["learning_rate"]]
        else:
            assert p["learning_rate"] is None
    # every curve is the run's own evaluations, and steps to target is their first crossing
    for r in study["rows"]:
        steps, values = zip(*r["curve"], strict=True)
        for t, s in r["steps_to"].items():
            assert s == first_crossing(steps, values, float(t))
    assert any(r["noise_b_simple"] for r in study["rows"] if r["stage"] == "seeds")

    main_out = tmp_path / "main"
    argv = [*common, "--rates", str(tuned / "batch_size_study.json"), "--targets", "0.02",
            "--out", str(main_out)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    again = json.loads((main_out / "batch_size_study_main.json").read_text())
    assert {r["stage"] for r in again["rows"]} == {"seeds"}
    assert sorted((r["batch_size"], r["seed"]) for r in again["rows"]) == [
        (64, 0), (64, 1), (128, 0), (128, 1)
    ]  # fmt: skip
    assert "run directory: " + str(main_out) in capsys.readouterr().out
