"""The soaked run's side of the soak: starting it, interrupting it, reading what it left.

:func:`schedule` draws the interruptions (:class:`Interruption`: which signal, at which
moment); :class:`StartedRun` is one start of the training command as a child process;
:func:`interrupt` waits for the scheduled moment, sends the signal(s) and waits for the exit,
and :func:`finish_attempt` records what the start left on disk (:class:`Attempt`):
``metrics.jsonl`` (:func:`logged_records`), the checkpoints (:func:`checkpoint_steps`) and
orbax's temporary folders (:func:`tmp_dirs`). :func:`describe` is its line of the log.
The command itself, and the comparison with the uninterrupted run, are
:mod:`experiments.soak` and :mod:`experiments.common.soak_checks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.common.cli import shared_module

REPO = Path(__file__).resolve().parents[2]
KINDS = ("SIGKILL", "SIGTERM", "SIGINT+SIGINT")
MOMENTS = ("checkpoint", "step", "startup")
ORBAX_TMP = ".orbax-checkpoint-tmp"
METRICS = "metrics.jsonl"
WAIT_EXIT_S = 120.0  # a run that outlives its SIGTERM / second SIGINT this long hangs


@dataclasses.dataclass(frozen=True)
class Interruption:
    """One scheduled interruption: which signal(s), and when.

    ``moment``: ``"checkpoint"`` = as soon as a new orbax temporary folder appears (a
    checkpoint write is under way); ``"step"`` = ``ahead`` steps after the last logged one,
    then ``fraction`` of a step later; ``"startup"`` = ``fraction`` of the start-up time
    after launch (imports, compilation, restore).
    """

    kind: str
    moment: str
    ahead: int
    fraction: float


def schedule(n: int, seed: int) -> list[Interruption]:
    """``n`` interruptions from ``seed``: every kind equally often (in a shuffled order), a
    checkpoint-write moment for about half of them, start-up for about one in seven."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    moments = rng.choices(MOMENTS, weights=(0.5, 0.35, 0.15), k=n)
    if n >= 2 and "checkpoint" not in moments:
        moments[rng.randrange(n)] = "checkpoint"
    return [
        Interruption(kind, moment, rng.randrange(0, 3), round(rng.random(), 3))
        for kind, moment in zip(kinds, moments, strict=True)
    ]


# --- the run on disk -------------------------------------------------------------------


def logged_records(workdir: Path) -> list[tuple[int, str]]:
    """``(step, line)`` of the whole records in ``metrics.jsonl``, in file order."""
    path = workdir / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    return out


def logged_steps(workdir: Path) -> list[int]:
    """The steps of the whole records in ``metrics.jsonl``, in file order."""
    return [step for step, _ in logged_records(workdir)]


def checkpoint_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def tmp_dirs(workdir: Path) -> set[tuple[str, int]]:
    """orbax's temporary checkpoint folders as ``(name, inode)``: a folder left by an earlier
    kill and one created anew under the same name differ by inode."""
    d = workdir / "checkpoints"
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return set()
    out = set()
    for e in entries:
        if ORBAX_TMP in e.name:
            try:
                out.add((e.name, e.inode()))
            except OSError:
                continue
    return out


# --- one attempt -------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    """What happened to one started run."""

    interruption: Interruption | None
    resumed_from: int = 0  # the newest checkpoint when it started
    signalled_at_s: float | None = None  # after launch
    steps_at_signal: int = 0  # steps this start had logged when the signal left
    in_checkpoint_write: bool = False  # a temporary folder existed when the signal left
    exit_code: int | None = None
    exit_after_signal_s: float | None = None  # after the last signal sent
    finished_first: bool = False  # the run ended before the interruption could land
    hung: bool = False
    last_stderr: str = ""
    logged_to: int = 0  # last whole step in metrics.jsonl when it ended
    checkpoint: int = 0  # newest checkpoint when it ended
    redone: int = 0  # steps it logged past its last checkpoint: done again by the next start


class StartedRun:
    """One start of the training command, its output in ``logs``.out/.err."""

    def __init__(self, cmd: list[str], env: dict[str, str], workdir: Path, logs: Path):
        self.workdir = workdir
        # What earlier starts left in the log: records this start writes are new lines
        # (their elapsed_s differs), so they can be told apart from stale ones it drops.
        self.stale = {line for _, line in logged_records(workdir)}
        self.resumed_from = max(checkpoint_steps(workdir), default=0)
        self.t0 = time.perf_counter()
        self.err_path = logs.with_suffix(".err")
        self._out = open(logs.with_suffix(".out"), "w")  # noqa: SIM115 - closed in wait()
        self._err = open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err, text=True
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def new_steps(self) -> list[int]:
        """The steps this start has logged so far."""
        return [step for step, line in logged_records(self.workdir) if line not in self.stale]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have ended already
            self.proc.send_signal(sig)

    def wait_for(self, condition, timeout: float, poll: float = 0.002) -> bool:
        """Poll ``condition()`` until it holds (True) or the run ends / time runs out."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if condition():
                return True
            if not self.alive():
                return False
            time.sleep(poll)
        return False

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if not self.alive():
                self._out.close()
                self._err.close()

    def last_stderr_line(self) -> str:
        lines = [x for x in self.err_path.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""


def interrupt(run: StartedRun, it: Interruption, steps: int, timing: dict[str, float]) -> Attempt:
    a = Attempt(it)
    workdir = run.workdir
    before = tmp_dirs(workdir)
    new_tmp = lambda: bool(tmp_dirs(workdir) - before)  # noqa: E731
    if it.moment == "startup":
        run.wait_for(lambda: False, it.fraction * timing["startup_s"], poll=0.01)
        landed = run.alive()
    elif it.moment == "step":
        # Past both the checkpoint it resumes from and any stale records of the killed run
        # (the new run drops those when it opens the log).
        done = max([*logged_steps(workdir), *checkpoint_steps(workdir), 0])
        target = min(done + 1 + it.ahead, steps - 1)
        landed = run.wait_for(
            lambda: max(logged_steps(workdir), default=0) >= target, 600.0, poll=0.01
        )
        if landed:
            time.sleep(it.fraction * timing["step_s"])
            landed = run.alive()
    else:  # checkpoint: the moment orbax's temporary folder of a new save appears
        landed = run.wait_for(new_tmp, 600.0)
    if not landed:
        a.finished_first = True
    else:
        a.signalled_at_s = round(run.elapsed(), 3)
        a.steps_at_signal = len(run.new_steps())
        a.in_checkpoint_write = new_tmp()
        if it.kind == "SIGKILL":
            run.send(signal.SIGKILL)
        elif it.kind == "SIGTERM":
            run.send(signal.SIGTERM)
        else:
            run.send(signal.SIGINT)
            # The second Ctrl-C: while the stop's checkpoint is written, if it gets there.
            before = tmp_dirs(workdir)
            run.wait_for(new_tmp, 30.0)
            a.in_checkpoint_write = a.in_checkpoint_write or new_tmp()
            run.send(signal.SIGINT)
    t_sig = time.perf_counter()
    code = run.wait(WAIT_EXIT_S if not a.finished_first else 600.0)
    if code is None:
        a.hung = True
        run.send(signal.SIGKILL)
        code = run.wait(60.0)
    a.exit_code = code
    a.exit_after_signal_s = round(time.perf_counter() - t_sig, 3)
    return a


def finish_attempt(a: Attempt, run: StartedRun) -> Attempt:
    a.last_stderr = run.last_stderr_line()
    a.resumed_from = run.resumed_from
    a.logged_to = max(logged_steps(run.workdir), default=0)
    a.checkpoint = max(checkpoint_steps(run.workdir), default=0)
    a.redone = sum(step > a.checkpoint for step in run.new_steps())
    return a


def describe(i: int, n: int, a: Attempt) -> str:
    it = a.interruption
    assert it is not None
    where = {
        "checkpoint": "as a checkpoint write began",
        "step": "mid-run",
        "startup": "soon after launch",
    }[it.moment]
    if a.finished_first:
        return f"interruption {i}/{n}: {it.kind} {where}: the run finished first"
    inside = ", a checkpoint write under way" if a.in_checkpoint_write else ""
    return (
        f"interruption {i}/{n}: {it.kind} {where} ({a.steps_at_signal} step(s) after "
        f"checkpoint {a.resumed_from}{inside}) at {a.signalled_at_s:.1f} s -> exit "
        f"{a.exit_code} after {a.exit_after_signal_s:.2f} s{' (HUNG)' if a.hung else ''}; "
        f"logged to step {a.logged_to}, checkpoint {a.checkpoint}, {a.redone} step(s) to redo"
    )


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
