"""The adaptive-batch stage's arithmetic (issue 33): steps and examples after warm-up at the
crossing, the meter's cost, and the fixed cells beside them, on rows built by hand. The stage
trained for real is in test_study_end_to_end.py."""

from __future__ import annotations

import pytest

from contrastive.configs import ConfigError
from experiments.study import adaptive_batch as ad
from experiments.study import protocol as P


def _row(seed: int, cross: int) -> dict:
    # B = 64 for 20 steps, then 128: examples after step s.
    path = [[s, 64 if s <= 20 else 128, 64 * min(s, 20) + 128 * max(0, s - 20)]
            for s in range(1, 61)]  # fmt: skip
    meter = [[s, 64 if s <= 20 else 128, 32] for s in (10, 20, 30, 40, 50, 60)]
    steps_to = {"3.0": cross, "3.5": None if seed == 2 else 15}
    return {"loss": "infonce", "factor": 1.0, "seed": seed, "batch_path": path,
            "meter": meter, "steps_to": steps_to}  # fmt: skip


def _committed() -> dict:
    cells = [("infonce", 64, 3.0, 54.0, (48.0, 61.0)), ("infonce", 256, 3.0, 16.0, (13.0, 19.0)),
             ("infonce", 64, 3.5, 18.0, (14.0, 22.0))]  # fmt: skip
    return {"targets": {"targets": [3.0, 3.5]},
            "summary": [{"loss": lo, "batch_size": b, "target": t, "geomean": g, "interval": iv}
                        for lo, b, t, g, iv in cells]}  # fmt: skip


def test_the_crossing_counts_steps_and_examples_after_the_warmup_and_the_meters_reads():
    got = ad._crossing(_row(1, 35), 3.0, 64)
    assert got["steps"] == 35 - P.WARMUP_STEPS
    assert got["examples"] == 64 * 20 + 128 * 15 - P.WARMUP_STEPS * 64
    assert got["batch_size"] == 128
    assert got["meter_examples"] == 32 * (64 + 64 + 128)  # the measurements at 10, 20, 30
    assert ad._crossing(_row(2, 35), 3.5, 64) is None


def test_summary_sets_the_fixed_cells_beside_and_calls_only_separated_intervals():
    rows = [_row(seed, 30 + seed) for seed in range(1, 6)]
    (hard, easy) = ad.summarise_adaptive(rows, _committed(), 64)
    assert hard["target"] == 3.0 and hard["missed"] == 0
    assert hard["fixed"]["fewest_steps"]["batch_size"] == 256
    assert hard["fixed"]["fewest_examples"]["batch_size"] == 64  # 54 x 64 < 16 x 256
    assert hard["fixed"]["fewest_steps"]["examples"]["interval"] == [13.0 * 256, 19.0 * 256]
    lo, hi = hard["steps"]["interval"]
    assert lo <= hard["steps"]["geomean"] <= hi
    assert "steps to 3: more than fixed B = 256 (the fewest steps)" in hard["verdicts"]
    assert "steps to 3: fewer than fixed B = 64 (the fewest examples)" in hard["verdicts"]
    assert easy["missed"] == 1 and "steps" not in easy and easy["verdicts"] == []


def test_the_stage_refuses_a_committed_study_without_the_start_rate():
    from experiments.study.settings import StudySettings

    s = StudySettings(out=None, losses=("infonce",), run_losses=("infonce",), batch_sizes=(64,),
                      train_examples=65536, feature_cache="", preset="reduced")  # fmt: skip
    with pytest.raises(ConfigError, match="no rate for infonce at B = 64"):
        ad.adaptive_runs(s, {"targets": {"targets": [3.0]}, "summary": []}, ["infonce"], 64, 256)
