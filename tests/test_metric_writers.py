"""TensorBoardWriter: event files that a kill at any moment, and the resume after it, leave
with every finished step exactly once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from contrastive.run import metric_writers
from contrastive.run.metric_writers import TensorBoardWriter, event_files, read_scalars


def _loss(step: int, session: int = 0) -> float:
    # Exactly representable in float32, and different in every session.
    return float(np.float32(1.0 / (step + 1) + session))


def _loaded(path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run directory, read with TensorBoard's own EventFileLoader."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in event_files(path):
        for event in EventFileLoader(f).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    (x,) = v.tensor.float_val
                    out.setdefault(v.tag, []).append((event.step, x))
    return out


def _texts(path) -> list[tuple[int, str, str]]:
    out = []
    for f in event_files(path):
        for event in EventFileLoader(f).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "text":
                    out.append((event.step, v.tag, v.tensor.string_val[0].decode()))
    return out


def _session(logdir, resume, steps, session=0, **kw) -> TensorBoardWriter:
    w = TensorBoardWriter(logdir, resume_from_step=resume, process_index=0, **kw)
    w.write_text("config", f"session {session}")
    for s in steps:
        w.write_scalars(s, {"loss": _loss(s, session), "lr": np.float32(0.5 * s)})
    w.close()
    return w


def test_scalars_and_text_read_back_with_their_steps(tmp_path):
    w = _session(tmp_path, 0, range(1, 6), run_name="train")
    assert w.path == str(tmp_path / "train") and os.path.dirname(w.file) == w.path
    got = _loaded(tmp_path / "train")
    assert got == {
        "loss": [(s, _loss(s)) for s in range(1, 6)],
        "lr": [(s, 0.5 * s) for s in range(1, 6)],
    }
    assert read_scalars(tmp_path / "train") == got
    assert _texts(tmp_path / "train") == [(0, "config/text_summary", "session 0")]
    # TensorBoard's accumulator (what its UI serves) sees the same series.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "train"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == got["loss"]


def test_resume_drops_the_steps_past_the_checkpoint(tmp_path):
    _session(tmp_path, 0, range(1, 9), session=0)  # checkpoint at 5, killed after 8
    first = event_files(tmp_path)
    w = _session(tmp_path, 5, range(6, 11), session=1)
    got = _loaded(tmp_path)
    assert got["loss"] == [(s, _loss(s, 0)) for s in range(1, 6)] + [
        (s, _loss(s, 1)) for s in range(6, 11)
    ]
    assert [s for s, _ in got["lr"]] == list(range(1, 11))
    files = event_files(tmp_path)
    assert len(files) == 2 and not set(files) & set(first) and files[-1] == w.file
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)
    # Killed again before the next checkpoint: resumed from 5 once more. The config text is
    # written once per session start, never twice at one step.
    _session(tmp_path, 5, range(6, 8), session=2)
    got = _loaded(tmp_path)
    assert [s for s, _ in got["loss"]] == list(range(1, 8))
    assert got["loss"][5:] == [(6, _loss(6, 2)), (7, _loss(7, 2))]
    assert _texts(tmp_path) == [
        (0, "config/text_summary", "session 0"),
        (5, "config/text_summary", "session 2"),
    ]


def test_nothing_is_rewritten_when_nothing_is_past_the_checkpoint(tmp_path):
    _session(tmp_path, 0, range(1, 5))  # stopped by SIGTERM: checkpoint at 4
    (old,) = event_files(tmp_path)
    inode = os.stat(old).st_ino
    _session(tmp_path, 4, range(5, 7), session=1)
    files = event_files(tmp_path)
    assert files[0] == old and os.stat(old).st_ino == inode and len(files) == 2
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == list(range(1, 7))


def test_resume_from_zero_and_none(tmp_path):
    _session(tmp_path, 0, range(1, 4))
    _session(tmp_path, 0, range(1, 3), session=1)  # killed before its first checkpoint
    assert _loaded(tmp_path)["loss"] == [(1, _loss(1, 1)), (2, _loss(2, 1))]
    assert [t for _, _, t in _texts(tmp_path)] == ["session 1"]
    _session(tmp_path, None, range(3, 5), session=2)  # no checkpoints: keep everything
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("cut", [1, 7, 13, 40])  # into the last record's crc, data, header
def test_torn_last_record(tmp_path, cut):
    _session(tmp_path, 0, range(1, 7))
    (f,) = event_files(tmp_path)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - cut)
    records = metric_writers._readable_records(f)
    assert records[1] < size and size - records[1] < 100  # only the last record is torn
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == [1, 2, 3, 4, 5]  # the reader copes
    _session(tmp_path, 4, range(5, 9), session=1)
    got = _loaded(tmp_path)
    assert got["loss"] == [(s, _loss(s)) for s in range(1, 5)] + [
        (s, _loss(s, 1)) for s in range(5, 9)
    ]
    assert f not in event_files(tmp_path)  # the torn file was rewritten


def test_torn_tail_is_repaired_even_without_steps_to_drop(tmp_path):
    _session(tmp_path, 0, range(1, 4))
    (f,) = event_files(tmp_path)
    with open(f, "ab") as fh:
        fh.write(b"\x07\x00\x00")  # a header cut short: a kill mid-write of step 4
    _session(tmp_path, 3, range(4, 6), session=1)
    assert f not in event_files(tmp_path)
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == [1, 2, 3, 4, 5]
    for g in event_files(tmp_path):
        assert metric_writers._readable_records(g)[1] == os.path.getsize(g)


def test_corrupt_record_in_the_middle_keeps_what_the_reader_could_read(tmp_path):
    _session(tmp_path, 0, range(1, 7))
    (f,) = event_files(tmp_path)
    data = bytearray(Path(f).read_bytes())
    count, _ = metric_writers._readable_records(f)
    data[len(data) // 2] ^= 0xFF
    Path(f).write_bytes(bytes(data))
    visible = [s for s, _ in _loaded(tmp_path)["loss"]]
    assert metric_writers._readable_records(f)[0] < count
    _session(tmp_path, 6, range(7, 9), session=1)
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == [*visible, 7, 8]


def _fs_ops(monkeypatch, fail_at: int) -> list[str]:
    """Make the ``fail_at``-th rename/unlink of the rewrite raise, as if killed there."""
    calls: list[str] = []
    real_replace, real_remove = os.replace, os.remove

    def counted(real, name):
        def op(*args):
            calls.append(name)
            if len(calls) == fail_at:
                raise KeyboardInterrupt("killed")
            return real(*args)

        return op

    monkeypatch.setattr(metric_writers.os, "replace", counted(real_replace, "replace"))
    monkeypatch.setattr(metric_writers.os, "remove", counted(real_remove, "remove"))
    return calls


def _no_duplicates(path) -> dict[str, list[int]]:
    steps = {tag: [s for s, _ in series] for tag, series in _loaded(path).items()}
    for tag, ss in steps.items():
        assert ss == sorted(set(ss)), f"{tag}: {ss}"
    return steps


def test_a_kill_at_any_point_of_the_rewrite_loses_nothing_and_duplicates_nothing(
    tmp_path, monkeypatch
):
    # Three old files (three sessions without a rewrite), then a resume that must rewrite.
    def history(d):
        _session(d, 0, range(1, 4))
        _session(d, 3, range(4, 7), session=1)
        _session(d, 6, range(7, 10), session=2)

    reference = tmp_path / "reference"
    history(reference)
    _session(reference, 7, range(8, 10), session=3)
    want = _loaded(reference)

    history(tmp_path / "count")
    with monkeypatch.context() as m:  # how many renames and deletions a rewrite makes
        calls = _fs_ops(m, fail_at=0)
        TensorBoardWriter(tmp_path / "count", resume_from_step=7, process_index=0).close()
    total = len(calls)

    for fail_at in range(1, total + 1):
        d = tmp_path / f"kill{fail_at}"
        history(d)
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            _fs_ops(m, fail_at)
            TensorBoardWriter(d, resume_from_step=7, process_index=0)
        # Whatever TensorBoard sees now has no step twice (steps <= 7 may be briefly
        # invisible, never lost: they are in the committed ready file).
        _no_duplicates(d)
        # The resumed run's open finishes (or redoes) the rewrite: exactly 1..7, then 8, 9.
        _session(d, 7, range(8, 10), session=3)
        assert _loaded(d) == want, f"killed at file operation {fail_at} of {total}"
        assert not [n for n in os.listdir(d) if n.startswith("compacting.")]
    assert total == 1 + 3 + 1  # partial -> ready, 3 old files removed, ready -> events file


def test_leftover_partial_file_is_discarded(tmp_path):
    _session(tmp_path, 0, range(1, 6))
    (tmp_path / "compacting.s000009.partial").write_bytes(b"half a rewrite")
    _session(tmp_path, 3, range(4, 6), session=1)
    assert not (tmp_path / "compacting.s000009.partial").exists()
    assert [s for s, _ in _loaded(tmp_path)["loss"]] == [1, 2, 3, 4, 5]
    # Session numbers keep growing past the discarded one: file names never collide.
    assert all(int(f[-6:]) > 9 for f in event_files(tmp_path))


@settings(max_examples=20)
@given(
    sessions=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 30)),
        min_size=1,
        max_size=5,
    )
)
def test_random_kill_and_resume_histories(tmp_path_factory, sessions):
    """Each session resumes from a checkpoint at or before what is logged, logs some steps,
    and may be killed mid-record; the files always read as the steps of the last session
    that logged each one, once each, in order."""
    d = tmp_path_factory.mktemp("hist")
    expected: dict[int, float] = {}
    checkpoint = 0
    for k, (back, n, tear) in enumerate(sessions):
        resume = max(0, checkpoint - back)
        expected = {s: v for s, v in expected.items() if s <= resume}
        w = TensorBoardWriter(d, resume_from_step=resume, process_index=0)
        for s in range(resume + 1, resume + 1 + n):
            w.write_scalars(s, {"loss": _loss(s, k)})
            expected[s] = _loss(s, k)
        w.close()
        checkpoint = resume + n  # the loop saves after it logs
        if tear and n:  # killed while writing the last step (records are > 30 bytes)
            with open(w.file, "r+b") as fh:
                fh.truncate(os.path.getsize(w.file) - tear)
            checkpoint -= 1  # so that step was never checkpointed
            expected = {s: v for s, v in expected.items() if s <= checkpoint}
    TensorBoardWriter(d, resume_from_step=checkpoint, process_index=0).close()
    assert _loaded(d).get("loss", []) == sorted(expected.items())


def test_other_processes_write_nothing(tmp_path):
    w = TensorBoardWriter(tmp_path / "tb", resume_from_step=0, run_name="r", process_index=1)
    assert not w.enabled and w.file is None
    w.write_text("config", "x")
    w.write_scalars(1, {"loss": 1.0})
    w.flush()
    w.close()
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match="must be a number"):
        w.write_scalars(2, {"loss": "high"})  # the same checks as on process 0


def test_process_index_comes_from_jax_by_default(tmp_path):
    with TensorBoardWriter(tmp_path, resume_from_step=0) as w:  # one process: process 0
        assert w.enabled and w.file is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resume_from_step": -1}, "resume_from_step must be None or an int >= 0"),
        ({"resume_from_step": 1.5}, "resume_from_step must be None or an int >= 0"),
        ({"resume_from_step": 0, "run_name": "a/b"}, "run_name must be"),
        ({"resume_from_step": 0, "process_index": -1}, "process_index must be"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorBoardWriter(tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


def test_bad_writes_are_refused_before_anything_is_written(tmp_path):
    with TensorBoardWriter(tmp_path, resume_from_step=3, process_index=0) as w:
        size = os.path.getsize(w.file)
        bad = [
            (3, {"loss": 1.0}, "not after the resume step 3"),
            (-1, {"loss": 1.0}, "step must be an int >= 0"),
            (4, {"loss": [1.0, 2.0]}, "'loss' must be a number"),
            (4, {"loss": True}, "'loss' must be a number"),
            (4, {"": 1.0}, "non-empty strings"),
        ]
        for step, scalars, message in bad:
            with pytest.raises(ValueError, match=message):
                w.write_scalars(step, scalars)
        assert os.path.getsize(w.file) == size
        w.write_scalars(5, {"loss": np.float32(np.nan), "acc": np.array(0.5)})
        with pytest.raises(ValueError, match="not after its last written step 5"):
            w.write_scalars(5, {"loss": 1.0})
        w.write_scalars(5, {"other": 1.0})  # another tag at the same step is fine
        with pytest.raises(ValueError, match="text must be a str"):
            w.write_text("config", {"a": 1})
    got = _loaded(tmp_path)
    assert np.isnan(got["loss"][0][1]) and got["acc"] == [(5, 0.5)]
    with pytest.raises(ValueError, match="closed"):
        w.write_scalars(6, {"loss": 1.0})
