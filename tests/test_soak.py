"""The kill-and-resume soak (experiments/soak.py): its schedule, its checks, a CI-sized run;
and the offline digits build that every first run does, quiet and leaving nothing behind."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contrastive.run.metric_writers import TensorBoardWriter
from experiments import soak

# --- the schedule ----------------------------------------------------------------------------


def test_schedule_is_seeded():
    assert soak.schedule(20, 0) == soak.schedule(20, 0)
    assert soak.schedule(20, 0) != soak.schedule(20, 1)
    assert soak.schedule(0, 0) == []


@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_schedule_uses_every_kind_equally_and_hits_checkpoint_writes(n, seed):
    plan = soak.schedule(n, seed)
    assert len(plan) == n
    counts = Counter(it.kind for it in plan)
    assert set(counts) <= set(soak.KINDS)
    assert max(counts.values()) - min(counts.get(k, 0) for k in soak.KINDS[: min(n, 3)]) <= 1
    if n >= 2:
        assert any(it.moment == "checkpoint" for it in plan)
    assert all(0 <= it.ahead <= 2 and 0.0 <= it.fraction <= 1.0 for it in plan)


# --- the checks ----------------------------------------------------------------------------


def _metrics(workdir: Path, rows) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def _rows(steps, loss=lambda s: 1.0 / s):
    return [{"step": s, "loss": loss(s), "elapsed_s": 0.1 * s} for s in steps]


def test_compare_metrics(tmp_path):
    ref = _metrics(tmp_path / "ref", _rows(range(1, 6)))
    same = _metrics(tmp_path / "same", [{**r, "elapsed_s": 9.0} for r in _rows(range(1, 6))])
    assert soak.compare_metrics(ref, same, 5) == []  # the wall clock may differ
    twice = _metrics(tmp_path / "twice", _rows([1, 2, 3, 3, 4, 5]))
    assert soak.compare_metrics(ref, twice, 5) == ["steps logged twice: [3]"]
    gap = _metrics(tmp_path / "gap", _rows([1, 2, 4, 5]))
    assert soak.compare_metrics(ref, gap, 5) == ["steps missing from the log: [3]"]
    # The smallest possible difference (one ulp) is a difference.
    bumped = lambda s: math.nextafter(1.0 / s, 1.0) if s == 4 else 1.0 / s  # noqa: E731
    off = _metrics(tmp_path / "off", _rows(range(1, 6), bumped))
    (problem,) = soak.compare_metrics(ref, off, 5)
    assert problem == "step 4: loss = 0.25000000000000006, uninterrupted 0.25"


def _events(d: Path, sessions, loss=lambda s: 1.0 / s) -> Path:
    for resume, steps in sessions:
        with TensorBoardWriter(d, resume_from_step=resume, process_index=0) as w:
            for s in steps:
                w.write_scalars(s, {"loss": loss(s), "elapsed_s": time.perf_counter()})
    return d


def test_compare_event_files(tmp_path):
    ref = _events(tmp_path / "ref" / "tb", [(0, range(1, 7))]).parent
    # Killed after 5 with a checkpoint at 3: the resumed writer drops 4, 5 and writes them again.
    good = _events(tmp_path / "good" / "tb", [(0, range(1, 6)), (3, range(4, 7))]).parent
    assert soak.compare_event_files(ref, good) == ([], 1)  # the wall clock may differ
    off = _events(tmp_path / "off" / "tb", [(0, range(1, 7))], lambda s: 1.0 / s + (s == 2)).parent
    assert soak.compare_event_files(ref, off)[0] == [
        "tb/loss: values differ from the uninterrupted run's"
    ]
    # A writer that kept everything on resume (resume_from_step=None) duplicates 4 and 5.
    dup = _events(tmp_path / "dup" / "tb", [(0, range(1, 6)), (None, range(4, 7))]).parent
    problems, _ = soak.compare_event_files(ref, dup)
    assert problems == [
        "tb/elapsed_s: steps written twice: [4, 5]",
        "tb/loss: steps written twice: [4, 5]",
    ]
    gap = _events(tmp_path / "gap" / "tb", [(0, [1, 2, 3, 5, 6])]).parent
    assert soak.compare_event_files(ref, gap)[0] == [
        "tb/elapsed_s: steps missing: [4]",
        "tb/loss: steps missing: [4]",
    ]
    (tmp_path / "none").mkdir()
    assert soak.compare_event_files(tmp_path / "none", tmp_path / "none") == ([], 0)
    assert soak.compare_event_files(ref, tmp_path / "none")[0] == [
        "event files in 0 directories, uninterrupted 1",
        "tb/elapsed_s: steps missing: [1, 2, 3, 4, 5, 6]",
        "tb/loss: steps missing: [1, 2, 3, 4, 5, 6]",
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "3"], "--steps 3 is too short to interrupt: use at least 4"),
        (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
        (["--interruptions", "-1"], "--interruptions -1 is negative"),
        (["--steps", "8", "--checkpoint-every", "5"], "--checkpoint-every 5 leaves fewer than 2"),
        (["--out", "{file}"], "is a file; pass a directory"),
        (["--out", "{full}"], "is not empty: pass a new directory"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    argv = [f.format(file=tmp_path / "file", full=tmp_path / "full") for f in flags]
    try:
        code = soak.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


# --- a CI-sized soak -------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_survives_interruptions_bit_identically(tmp_path, capsys):
    """4 interruptions (every kind, at least one inside a checkpoint write) of a 16-step run
    on 2 simulated devices: the final state and every logged step match an uninterrupted
    run exactly; nothing logged twice or lost. About six starts of the training command."""
    out = tmp_path / "soak"
    argv = ["--steps", "16", "--interruptions", "4", "--seed", "3", "--devices", "2"]
    assert soak.main([*argv, "--out", str(out)]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"run directory: {out}"
    assert printed[-2].startswith("interruptions survived: 4 of 4 (")
    report = json.loads((out / "soak.json").read_text())
    assert report["ok"] and report["problems"] == []
    assert report["survived"] == 4 and report["steps_lost_or_twice"] == 0
    assert all(report["by_kind"][k] >= 1 for k in soak.KINDS)
    assert report["inside_checkpoint_writes"] >= 1
    assert report["arrays_compared"] > 10
    assert not any(a["hung"] for a in report["attempts"])
    assert report["attempts"][-1]["exit_code"] == 0
    for a in report["attempts"][:-1]:
        if a["interruption"]["kind"] == "SIGTERM" and a["exit_code"] == 0:
            assert a["redone"] == 0  # a SIGTERM saves the step it stops at


# --- the offline digits: a first build is quiet and leaves nothing behind -----------------


def test_first_digits_build_is_quiet_and_leaves_no_temporary_folder(
    tmp_path, monkeypatch, capfd, caplog
):
    from contrastive.data import prepare_digits

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # tempfile caches the folder
    caplog.set_level(logging.INFO)
    for attempt in ("first build", "already prepared"):
        builder = prepare_digits(tmp_path / "data")
        assert builder.is_prepared(), attempt
        out, err = capfd.readouterr()
        said = "\n".join([out, err, *(r.getMessage() for r in caplog.records)])
        for phrase in ("Downloading", "download", "Variant folder", "dataset_info.json"):
            assert phrase not in said, (attempt, said)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], attempt
        assert os.listdir(tmp) == [], attempt  # no tmp*tfds folder
        caplog.clear()
    assert len(builder.as_data_source(split="train")) == 1438
