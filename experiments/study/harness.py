"""One harness for a study's runs: its run directory, its lock, each run's row, resume.

A study's ``--out`` holds ``runs/<name>/`` (each run's work dir: ``metrics.jsonl``, its
config and, while it trains, its checkpoint), ``rows/<name>.json`` (the row of a finished
run, written atomically) and ``locks/<loss>.lock``. A run whose row exists is read back, not
trained again, so a study cut short resumes where it stopped; once its row is written a run's
checkpoints are deleted (a finished run needs only its row and its curve: about 100 MB saved
per run), and the row is what every report is computed from.

Several processes may share one ``--out`` when each trains other losses (``--run-losses``):
each holds the lock of every loss it trains, so a second process that asks for a loss
already being trained stops at once with one line, instead of meeting that process's busy
runs and recording them as failures.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import ConfigError
from experiments.common.reports import write_json
from experiments.study.runs import StudyRun, StudyStopped, run_to_target

__all__ = ["Study", "StudyRun", "StudyStopped", "loss_locks", "read_rows", "time_line"]


@contextlib.contextmanager
def loss_locks(out: Path, losses: Sequence[str]) -> Iterator[None]:
    """Hold ``out/locks/<loss>.lock`` for each loss this process trains; ConfigError (one
    line) naming the loss if another process holds it. The OS releases a lock when its
    process dies, so a killed study never leaves a stale one."""
    folder = out / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    try:
        for loss in losses:
            f = open(folder / f"{loss}.lock", "a+")  # noqa: SIM115 (held until the block ends)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise ConfigError(
                    f"another process is training {loss}'s runs in {out}: wait for it, or give "
                    "this one other --run-losses (or another --out)"
                ) from None
            held.append(f)
        yield
    finally:
        for f in held:
            f.close()


def is_locked(out: Path, loss: str) -> bool:
    """Whether another process holds ``loss``'s lock in ``out`` (trains it now)."""
    path = out / "locks" / f"{loss}.lock"
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def read_rows(out: Path) -> dict[str, dict]:
    """Every finished run's row in ``out``, by run name."""
    folder = out / "rows"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


class Study:
    """The runs of one study in ``out``: trains a run once, then reads its row back."""

    def __init__(self, out: Path, metric: str, targets: Sequence[float]) -> None:
        self.out, self.metric, self.targets = out, metric, list(targets)
        (out / "rows").mkdir(parents=True, exist_ok=True)
        self.count = 0

    def row_path(self, run: StudyRun) -> Path:
        return self.out / "rows" / f"{run.name}.json"

    def run(self, run: StudyRun, **extra: Any) -> dict:
        """The row of ``run`` (trained now, or read back), with ``extra`` keys added."""
        path = self.row_path(run)
        if path.exists():
            return json.loads(path.read_text())
        self.count += 1
        row = run_to_target(run, self.out, self.metric, self.targets, f"{self.count}")
        row.update(name=run.name, **extra)
        write_json(path, row)
        # The row holds what the study reads; the checkpoints only served a resume.
        shutil.rmtree(self.out / "runs" / run.name / "checkpoints", ignore_errors=True)
        return row

    def write(self, name: str, record: dict) -> Path:
        """``record`` as ``out/name`` (JSON)."""
        path = self.out / name
        write_json(path, record)
        return path


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def time_line(rows: Sequence[dict], call_time_s: float) -> str:
    """A stage report's last line: its runs' own training time (from their logs, the same
    whether trained now or read back) and this call's."""
    trained = sum(r.get("train_s") or 0 for r in rows)
    return (f"Training time, the runs' own (evaluations and meter included): "
            f"{trained / 60:.1f} min; this call {call_time_s / 60:.1f} min (finished runs are "
            "read back).")  # fmt: skip
