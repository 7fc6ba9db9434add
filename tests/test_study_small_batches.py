"""The small-batches stage's arithmetic (SogCLR and iSogCLR against InfoNCE, issue 34): its
summary, matched batch sizes, verdicts and headline on rows built by hand, and its one-line
errors before any run. The stage trained for real is in test_study_end_to_end.py."""

from __future__ import annotations

import doctest
import math

import pytest

from experiments import batch_size_study
from experiments.study import protocol as P
from experiments.study import small_batches as sb
from experiments.study.small_batches_report import headline


def _row(arm: str, b: int, seed: int, step3: int | None, step35: int, acc: float) -> dict:
    return {"arm": arm, "batch_size": b, "seed": seed, "loss": sb.arm_settings(arm, b)[0],
            "learning_rate": 1e-3, "cap": 100, "train_s": 10.0,
            "steps_to": {"3.0": step3, "3.5": step35}, "zero_shot_top1": acc}  # fmt: skip


def _rows() -> list[dict]:
    rows = []
    for seed in range(1, 6):
        rows += [
            _row("infonce", 64, seed, 60 + seed, 30 + seed, 0.20 + 0.002 * seed),
            _row("sogclr", 64, seed, 40 + seed, 20 + seed, 0.30 + 0.002 * seed),
            _row("queue", 64, seed, None if seed == 3 else 50, 25, 0.21 + 0.002 * seed),
            _row("infonce", 1024, seed, 20 + seed, 12, 0.29 + 0.002 * seed),
        ]
    return rows


def test_summary_counts_steps_after_warmup_and_the_seeds_that_missed():
    summary = {(p["arm"], p["batch_size"]): p for p in sb.summarise_arms(_rows(), [3.0, 3.5])}
    s = summary[("sogclr", 64)]["steps"]["3.0"]
    steps = [40 + k - P.WARMUP_STEPS for k in range(1, 6)]
    assert s["values"] == steps and s["missed"] == 0
    assert s["geomean"] == pytest.approx(math.exp(sum(map(math.log, steps)) / 5))
    lo, hi = s["interval"]
    assert lo < s["geomean"] < hi and s["examples"] == pytest.approx(64 * s["geomean"])
    q = summary[("queue", 64)]["steps"]["3.0"]
    assert q["missed"] == 1 and "geomean" not in q  # a seed that missed: no mean, said so
    acc = summary[("infonce", 1024)]["accuracy"]
    assert acc["mean"] == pytest.approx(0.296) and acc["interval"][0] < 0.296 < acc["interval"][1]


def test_verdicts_and_headline_follow_the_intervals():
    summary = sb.summarise_arms(_rows(), [3.0, 3.5])
    v = sb.verdicts(summary, [64], 1024, [3.0, 3.5])
    got = {(x["what"], x["arm"], x["against"], x.get("target")): x["answer"] for x in v}
    assert got[("steps", "sogclr", "InfoNCE at B = 64", 3.0)] == "better"
    assert got[("accuracy", "sogclr", "InfoNCE at B = 64", None)] == "better"
    assert got[("accuracy", "infonce", "InfoNCE at B = 1024", None)] == "worse"
    assert ("steps", "queue", "InfoNCE at B = 64", 3.0) not in got  # one seed missed
    record = {"large_batch": 1024, "batch_sizes": [64], "verdicts": v}
    (line,) = headline(record)
    assert line.startswith("reproduces at B = 64")
    # SogCLR below the large batch: the claim does not reproduce.
    worse = [r if r["arm"] != "sogclr" else {**r, "zero_shot_top1": r["zero_shot_top1"] - 0.2}
             for r in _rows()]  # fmt: skip
    v = sb.verdicts(sb.summarise_arms(worse, [3.0]), [64], 1024, [3.0])
    (line,) = headline({**record, "verdicts": v})
    assert line.startswith("does not reproduce at B = 64")


def test_accuracy_match_bounds_outside_the_infonce_range():
    summary = [{"arm": "infonce", "batch_size": b, "accuracy": {"mean": a}}
               for b, a in [(64, 0.2), (256, 0.25), (1024, 0.3)]]  # fmt: skip
    summary += [{"arm": "sogclr", "batch_size": 64, "accuracy": {"mean": 0.35}},
                {"arm": "queue", "batch_size": 64, "accuracy": {"mean": 0.1}},
                {"arm": "isogclr", "batch_size": 64, "accuracy": {"mean": 0.25}}]  # fmt: skip
    m = sb.accuracy_match(summary)
    assert m[("sogclr", 64)] == {"batch": None, "bound": ">", "of": 1024}
    assert m[("queue", 64)] == {"batch": None, "bound": "<", "of": 64}
    assert m[("isogclr", 64)] == pytest.approx(256)


def test_examples_in_the_module_run():
    result = doctest.testmod(sb)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--small-batch-arms", "sogclr,nope"], "--small-batch-arms: unknown arm 'nope'"),
        (["--budget-examples", "1000"], "--budget-examples 1000 is not a multiple of B = 64"),
        (["--batch-sizes", "64"], "--small-batches with --batch-sizes: give two or more"),
    ],
)
def test_bad_small_batch_flags_are_one_line_before_any_run(flags, message, tmp_path, capsys):
    status = batch_size_study.main(["--small-batches", *flags, "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_rate_is_chosen_for_the_easier_target_only_when_none_reached_the_harder():
    rows = [{"exponent": k, "steps_to": {"3.0": None, "3.5": s}}
            for k, s in [(-1, 120), (0, 99), (1, 110)]]  # fmt: skip
    r = sb._chosen("queue", 64, rows, [3.0, 3.5])
    assert r["chosen_for"] == 3.5 and r["exponent"] == 0
    assert r["learning_rate"] == pytest.approx(P.rate(64, 0))
    rows[2]["steps_to"]["3.0"] = 200  # one rate reached the harder target: that one
    assert sb._chosen("queue", 64, rows, [3.0, 3.5])["exponent"] == 1
    missed = [{"exponent": k, "steps_to": {"3.0": None, "3.5": None}} for k in (0, 1)]
    assert sb._chosen("queue", 64, missed, [3.0, 3.5])["learning_rate"] is None


def test_a_small_batches_setting_without_the_stage_is_one_line(tmp_path, capsys):
    argv = ["--budget-examples", "4096", "--out", str(tmp_path / "out")]
    assert batch_size_study.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --budget-examples is a setting of --small-batches: add it, or drop "
                   "--budget-examples")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arm", sb.ARMS)
@pytest.mark.parametrize("batch_size", sb.ARM_SIZES)
def test_every_arm_builds_a_valid_run_config(arm, batch_size):
    # What the stage trains: the study's base config with the arm's loss and settings.
    loss, updates = sb.arm_settings(arm, batch_size)
    cfg = P.base_config(65536, "/tmp/features", stop_at=3.0).with_updates(
        loss=loss, batch_size=batch_size, learning_rate=1e-3, seed=1, steps=10, **updates
    )
    assert cfg.train.loss.name == loss
    if arm == "queue":
        assert cfg.train.negative_queue == sb.QUEUE_NEGATIVES // batch_size - 1
    if arm == "sogclr":
        assert not cfg.model.learn_temperature and cfg.model.temperature == 0.1
    if arm == "isogclr":
        assert cfg.train.loss.individual_temperature and cfg.train.loss.rho == 1.0
