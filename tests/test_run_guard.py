"""WorkdirLock, MetricsLog, StopSignals: one run per work dir, a crash-proof metrics log,
graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from contrastive.run.run_guard import (
    MetricsLog,
    StopNow,
    StopSignals,
    WorkdirLock,
    WorkdirLockedError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# --- WorkdirLock ---------------------------------------------------------------------------


def test_lock_refuses_a_second_run_in_another_process(tmp_path):
    with WorkdirLock(tmp_path, process_index=0) as lock:
        assert lock.taken_over_from is None
        p = _python(
            f"""
            from contrastive.run.run_guard import WorkdirLock, WorkdirLockedError
            try:
                WorkdirLock({str(tmp_path)!r}, process_index=0).acquire()
            except WorkdirLockedError as e:
                print(e)
            """
        )
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    msg = out.strip()
    assert "\n" not in msg
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in msg
    # Released cleanly: the file is gone, and the next holder takes over nobody's lock.
    assert not (tmp_path / "run.lock.0").exists()
    with WorkdirLock(tmp_path, process_index=0) as again:
        assert again.taken_over_from is None
    assert list(tmp_path.iterdir()) == []


def test_a_lock_opened_before_a_release_is_taken_on_the_new_file(tmp_path):
    """A process that opened ``run.lock.0`` while another held it, and locks it after the
    holder released (and removed) it, must not hold a file that is no longer the path: it
    locks the current file, so a third process is refused."""
    import fcntl

    holder = WorkdirLock(tmp_path, process_index=0).acquire()
    stale = os.open(holder.path, os.O_RDWR)  # opened before the release
    real_open = os.open
    calls = []

    def open_stale_first(path, flags, mode=0o777):
        calls.append(path)
        return os.dup(stale) if len(calls) == 1 else real_open(path, flags, mode)

    holder.release()
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "open", open_stale_first)
    try:
        second = WorkdirLock(tmp_path, process_index=0).acquire()
    finally:
        mp.undo()
    assert len(calls) == 2  # the stale file was locked, seen to be gone, and let go
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds the stale file
    os.close(stale)
    with pytest.raises(WorkdirLockedError):
        WorkdirLock(tmp_path, process_index=0).acquire()
    second.release()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = _python(
        f"""
        import time
        from contrastive.run.run_guard import WorkdirLock
        WorkdirLock({str(tmp_path)!r}, process_index=0).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {holder.pid} on host "):
            WorkdirLock(tmp_path, process_index=0).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    with WorkdirLock(tmp_path, process_index=0) as lock:
        assert lock.taken_over_from == f"pid {holder.pid} on host {socket.gethostname()}"
        assert Path(lock.path).read_text() == f"{os.getpid()} {socket.gethostname()}\n"


def test_each_process_of_a_multi_process_run_locks_its_own_file(tmp_path):
    with WorkdirLock(tmp_path, process_index=0), WorkdirLock(tmp_path, process_index=1) as one:
        assert one.path.endswith("run.lock.1")
        with pytest.raises(WorkdirLockedError, match="run.lock.1"):
            WorkdirLock(tmp_path, process_index=1).acquire()


def test_lock_bad_process_index(tmp_path):
    with pytest.raises(ValueError, match="process_index"):
        WorkdirLock(tmp_path, process_index=-1)


# --- MetricsLog ----------------------------------------------------------------------------


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_metrics_log_drops_torn_line_and_records_past_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    path.write_text(whole + '{"step": 6, "lo')  # killed (or disk full) mid-line
    with MetricsLog.open(path, upto_step=3) as log:
        assert [r["step"] for r in log.records()] == [1, 2, 3]
        assert _lines(path) == log.records()  # rewritten: whole lines of steps <= 3 only
        log.append({"step": 4, "loss": 0.25})
        log.append({"step": 5, "loss": float("nan")})
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4, 5]
    warned = [r.getMessage() for r in caplog.records]
    assert any("dropped 1 unparseable line(s) and 2 record(s) past step 3" in m for m in warned)


def test_metrics_log_is_not_rewritten_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    inode = os.stat(path).st_ino
    with MetricsLog.open(path, upto_step=2) as log:
        log.append({"step": 3})
    assert os.stat(path).st_ino == inode
    assert _lines(path) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_metrics_log_reader_never_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    before = path.read_bytes()
    with MetricsLog.open(path, upto_step=1, write=False) as log:
        log.append({"step": 2})
        assert log.records() == [{"step": 1}, {"step": 2}]
    assert path.read_bytes() == before
    with MetricsLog.open(tmp_path / "new" / "metrics.jsonl", upto_step=0, write=False) as log:
        assert log.records() == []
    assert not (tmp_path / "new").exists()


def test_metrics_log_fresh_file_and_bad_input(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog.open(path, upto_step=0) as log:
        log.append({"step": 1, "loss": 2.0})
        with pytest.raises(ValueError, match="int 'step'"):
            log.append({"loss": 1.0})
        with pytest.raises(TypeError):
            log.append({"step": 2, "x": object()})  # not JSON: nothing written
    assert _lines(path) == [{"step": 1, "loss": 2.0}]
    with pytest.raises(ValueError, match="upto_step"):
        MetricsLog.open(path, upto_step=-1)


# --- StopSignals ---------------------------------------------------------------------------


def test_sigterm_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested and stop.name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM" and stop.agreed()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_sigint_interrupts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # the handler runs between bytecodes
        pass


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),  # a scheduler repeating its SIGTERM
        (signal.SIGINT, signal.SIGINT),  # Ctrl-C twice
        (signal.SIGTERM, signal.SIGINT),
    ],
)
def test_second_signal_during_the_checkpoint_write_stops_at_once(first, second):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(StopNow) as e, StopSignals() as stop:
        stop.checkpointed("/w/checkpoints/12")
        _deliver(first)
        assert stop.requested and stop.name == first.name
        try:
            with stop.saving():  # the stop's checkpoint, 13, is being written
                _deliver(second)
                reached.append("the save went on")
        except Exception:  # the loop's error handling must not swallow it
            reached.append("caught as an Exception")
    assert reached == []
    assert isinstance(e.value, KeyboardInterrupt)
    assert e.value.signum == second and e.value.last_checkpoint == "/w/checkpoints/12"
    assert e.value.line == (
        f"second {second.name}: stopped at once, abandoning the checkpoint being written; "
        "the last good checkpoint is /w/checkpoints/12: run the same command to resume from it"
    )
    assert str(e.value) == e.value.line and "\n" not in e.value.line
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_signal_mid_step_and_before_any_checkpoint():
    with StopSignals() as stop:
        _deliver(signal.SIGINT)
        with pytest.raises(StopNow, match="^second SIGTERM: stopped at once, mid-step; no "):
            _deliver(signal.SIGTERM)
        assert stop.name == "SIGINT"  # the first signal is what `name` reports
        with pytest.raises(StopNow, match="no checkpoint was written yet: run the same command"):
            _deliver(signal.SIGINT)  # and every later one stops again
        stop.checkpointed("ckpt/3")
        with stop.saving(), stop.saving():
            pass
        with pytest.raises(StopNow, match="mid-step; the last good checkpoint is ckpt/3: "):
            _deliver(signal.SIGINT)


def test_second_signal_exits_the_process_at_once_with_one_line():
    """``on_second="exit"``: a checkpoint write that would take a minute is abandoned; the
    process ends with status 128 + signal number and one line on stderr."""
    p = _python(
        """
        import os, sys, time
        from contrastive.run.run_guard import StopSignals
        with StopSignals(on_second="exit") as stop:
            stop.checkpointed("/w/checkpoints/4")
            print("ready", flush=True)
            while not stop.requested:
                time.sleep(0.01)
            with stop.saving():
                print("saving", flush=True)
                try:
                    time.sleep(60)  # a slow checkpoint write
                finally:
                    print("finally ran", flush=True)  # os._exit skips it
        """
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline().strip() == "saving"
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert time.perf_counter() - t0 < 10
    assert p.returncode == 128 + signal.SIGINT, err
    assert out == ""
    assert err.splitlines() == [
        "received SIGTERM: stopping after this step",
        "second SIGINT: stopped at once, abandoning the checkpoint being written; the last "
        "good checkpoint is /w/checkpoints/4: run the same command to resume from it",
    ]


def test_sigterm_in_a_child_ends_it_cleanly():
    # A loop that checks the flag after each step, as the training loop does.
    p = _python(
        """
        import time
        from contrastive.run.run_guard import StopSignals
        with StopSignals() as stop:
            print("ready", flush=True)
            for step in range(1, 600):
                time.sleep(0.05)
                if stop.requested:
                    print(f"stopped by {stop.name} after step {step}", flush=True)
                    break
        """
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.startswith("stopped by SIGTERM after step ")
    assert "received SIGTERM: stopping after this step" in err


def test_stop_signals_bad_input():
    with pytest.raises(ValueError, match="signals"):
        StopSignals(signals=())
    with pytest.raises(ValueError, match="on_second must be 'raise' or 'exit'"):
        StopSignals(on_second="kill")


def test_docstring_examples(tmp_path, monkeypatch):
    import doctest
    import tempfile

    import contrastive.run.run_guard

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() folders
    result = doctest.testmod(contrastive.run.run_guard, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
