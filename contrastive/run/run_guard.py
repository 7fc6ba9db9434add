"""What keeps a training run's work dir consistent across crashes, restarts and preemption.

- :class:`WorkdirLock`: one run per work dir. A second run on the same work dir is refused
  with a one-line :class:`WorkdirLockedError` naming the holder's pid and host; a lock left by
  a killed process is taken over (the kernel releases an ``flock`` when its holder dies).
- :class:`MetricsLog`: ``metrics.jsonl`` that survives a crash at any byte: reopening it
  drops a torn line and the records past the restored checkpoint, and every record is
  appended as one whole line, flushed and fsynced.
- :class:`StopSignals`: SIGTERM (preemption) and SIGINT set a flag instead of killing the
  process, so the training loop can save a checkpoint and exit 0. A second one stops at once
  (:class:`StopNow`), with one line naming the last good checkpoint.

Typical use in a training loop (``ckpt`` a :class:`contrastive.run.checkpoint.Checkpointer`)::

    try:
        with WorkdirLock(workdir), StopSignals() as stop:
            state, meta, start = ckpt.restore_latest(state)
            if start is not None:
                stop.checkpointed(f"{ckpt.directory}/{start}")
            metrics = MetricsLog.open(f"{workdir}/metrics.jsonl", upto_step=start or 0,
                                      write=jax.process_index() == 0)
            for step in range(start or 0, num_steps):
                state, m = train_step(state, ...)
                metrics.append({"step": step + 1, **m})
                if stop.agreed():             # all processes stop at the same step
                    with stop.saving():       # a second signal abandons this save
                        ckpt.save(step + 1, state, meta, force=True)
                    stop.checkpointed(f"{ckpt.directory}/{step + 1}")
                    print(f"stopped by {stop.name} after step {step + 1}; checkpoint saved")
                    break
    except StopNow as e:
        print(e.line, file=sys.stderr)  # "second SIGINT: stopped at once, ...; the last good
        sys.exit(130)                   #  checkpoint is .../12: run the same command ..."
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["MetricsLog", "StopNow", "StopSignals", "WorkdirLock", "WorkdirLockedError"]

log = logging.getLogger(__name__)


def current_process_index() -> int:
    import jax

    return jax.process_index()


def fsync_dir(path: str) -> None:
    # A rename is durable only once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- work dir lock -------------------------------------------------------------------------


class WorkdirLockedError(RuntimeError):
    """Another live process holds the work dir (one-line message naming its pid and host)."""


class WorkdirLock:
    """An exclusive lock on ``workdir`` for this process, held for the ``with`` block.

    The lock is ``fcntl.flock`` on ``workdir/run.lock.<process_index>``, a file holding
    ``"<pid> <host>"`` of the holder. The kernel drops an ``flock`` when its holder dies
    (also on SIGKILL), so a lock left by a killed run is simply taken over; ``taken_over_from``
    then says whose it was. A clean release removes the file while still holding the lock; a
    process that opened the old file before the removal and locks it afterwards sees that
    the path no longer names the file it locked and tries again on the new one, so two
    processes never hold two different files of the same name.

    Multi-process runs (one process per host, one shared work dir, the same command): each
    process locks its own file, so process ``i`` of a second run is refused by process ``i``
    of the first. On NFS, Linux implements ``flock`` with NFS byte-range locks, which work
    across clients.

    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with WorkdirLock(workdir, process_index=0) as lock:
    ...     WorkdirLock(workdir, process_index=0).acquire()  # a second run
    Traceback (most recent call last):
    ...
    contrastive.run.run_guard.WorkdirLockedError: work dir ... is in use by pid ... on host ...

    Args:
      workdir: the run directory; created if missing.
      process_index: which process of a multi-process run this is; ``None`` asks
        ``jax.process_index()`` (initialise ``jax.distributed`` first).
    """

    def __init__(self, workdir: str | os.PathLike, *, process_index: int | None = None):
        if process_index is not None and (not isinstance(process_index, int) or process_index < 0):
            raise ValueError(f"process_index must be an int >= 0, got {process_index!r}")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.process_index = process_index
        self.path: str | None = None
        self.taken_over_from: str | None = None
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Take the lock; raises :class:`WorkdirLockedError` when a live process holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        index = current_process_index() if self.process_index is None else self.process_index
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, f"run.lock.{index}")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OSError(e.errno, f"cannot lock {self.path}: {e.strerror}") from None
                who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another run"
                raise WorkdirLockedError(
                    f"work dir {self.workdir} is in use by {who} (lock {self.path}): wait for "
                    "that run to end or use another work dir"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder released (and removed) the file between our open and our lock.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").split()
        if len(previous) >= 2:  # a holder that died without releasing
            self.taken_over_from = f"pid {previous[0]} on host {previous[1]}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then release the lock (idempotent): a clean exit leaves no
        ``run.lock.*`` behind."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- metrics log ---------------------------------------------------------------------------


class MetricsLog:
    """A JSON-lines metrics file (one ``{"step": int, ...}`` object per line) that a crash at
    any byte cannot spoil.

    :meth:`open` reads the existing file, drops unparseable lines (a line torn by a crash or a
    full disk; only the last one can be, as records are written whole) and every record with
    ``step > upto_step`` (a killed run may have logged past its last checkpoint), and rewrites
    the file atomically (temporary file, fsync, rename) only when it dropped something.
    :meth:`append` writes each record as one line, flushed and fsynced; a failed write is
    truncated away so the file never ends in a torn line that the next append would extend.

    In a multi-process run only one process should write: open it with ``write=False``
    elsewhere, which reads the file and keeps appended records in memory only.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> with open(path, "w") as f:  # a run killed mid-line, after its checkpoint at step 1
    ...     _ = f.write('{"step": 1, "loss": 2.5}\\n{"step": 2, "loss": 2.4}\\n{"step": 3, "lo')
    >>> with MetricsLog.open(path, upto_step=1) as m:
    ...     m.append({"step": 2, "loss": 2.4})
    ...     [r["step"] for r in m.records()]
    [1, 2]
    """

    def __init__(self, path: str, records: list[dict[str, Any]], *, write: bool):
        self.path = path
        self.write = write
        self._records = records
        self._fd: int | None = None
        if write:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def open(cls, path: str | os.PathLike, upto_step: int, *, write: bool = True) -> MetricsLog:
        """The log at ``path`` holding its records of steps ``<= upto_step``, ready to append.

        Args:
          path: the ``.jsonl`` file; created (with its directory) when missing and ``write``.
          upto_step: the step the run resumes from (0 for a fresh run).
          write: whether this process writes the file (``False``: read only).
        """
        if not isinstance(upto_step, int) or upto_step < 0:
            raise ValueError(f"upto_step must be an int >= 0, got {upto_step!r}")
        path = os.path.abspath(os.fspath(path))
        text = ""
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        records: list[dict[str, Any]] = []
        torn = past = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                torn += 1
            elif rec["step"] > upto_step:
                past += 1
            else:
                records.append(rec)
        if torn or past:
            log.warning(
                "%s: dropped %d unparseable line(s) and %d record(s) past step %d",
                path,
                torn,
                past,
                upto_step,
            )
        if write:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if torn or past or (text and not text.endswith("\n")):
                cls._rewrite(path, records)
        return cls(path, records, write=write)

    @staticmethod
    def _rewrite(path: str, records: list[dict[str, Any]]) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` (a JSON-serialisable dict with an int ``"step"``) as one line."""
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"record must be a dict with an int 'step', got {record!r}")
        data = (json.dumps(record) + "\n").encode()  # a TypeError here writes nothing
        if self._fd is not None:
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):  # whole lines only, e.g. after ENOSPC
                    os.ftruncate(self._fd, start)
                raise
        self._records.append(record)

    def records(self) -> list[dict[str, Any]]:
        """Every record in the log, oldest first (a copy)."""
        return list(self._records)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- stop signals --------------------------------------------------------------------------


class StopNow(KeyboardInterrupt):
    """A second stop signal: the user (or the cluster) wants the process gone now.

    A ``KeyboardInterrupt``, so that ``except Exception`` clauses let it through. ``line`` is
    the one line to print: which signal, whether a checkpoint write was abandoned, and the
    last good checkpoint to resume from (``last_checkpoint``, ``None`` when there is none).
    """

    def __init__(self, line: str, *, signum: int, last_checkpoint: str | None):
        super().__init__(line)
        self.line = line
        self.signum = signum
        self.last_checkpoint = last_checkpoint


class StopSignals:
    """Within the ``with`` block, SIGTERM and SIGINT request a stop instead of killing.

    The first signal sets ``requested`` (and ``signum`` / ``name``); the training loop checks
    it after each step, saves a checkpoint and exits 0. A second signal (SIGTERM or SIGINT,
    e.g. a user pressing Ctrl-C twice, or a scheduler that repeats its SIGTERM) means "now":
    whatever is running, the stop's checkpoint write included, is abandoned. That is safe:
    checkpoints are atomic (a write cut short leaves only a temporary folder, never a step),
    the metrics log and the event files drop a torn record when reopened, and the kernel
    releases the work dir lock. What happens then is ``on_second``:

    - ``"raise"`` (default): the handler raises :class:`StopNow` in the main thread; its
      ``line`` names the last good checkpoint. The caller prints it and exits (``finally``
      blocks still run on the way out).
    - ``"exit"``: the handler writes that line to stderr and ends the process with
      ``os._exit(128 + signum)`` on the spot, as a SIGKILL would: no ``finally`` block, no
      ``atexit`` hook, nothing that could wait on a half-done write. For command-line
      entry points, never for a process that must survive (a notebook kernel).

    The loop tells it the last good checkpoint with :meth:`checkpointed` (after a restore and
    after each save) and marks a save with :meth:`saving`, so that the line can say so.

    In a multi-process run each process may receive its signal at a different step; call
    :meth:`agreed` (a tiny collective) so that all stop, and save, at the same step.

    >>> import os, signal
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     stop.requested, stop.name
    (True, 'SIGTERM')
    >>> with StopSignals() as stop:
    ...     stop.checkpointed("/run/checkpoints/12")
    ...     os.kill(os.getpid(), signal.SIGINT)
    ...     try:
    ...         with stop.saving():
    ...             os.kill(os.getpid(), signal.SIGINT)  # while checkpoint 13 is written
    ...     except StopNow as e:
    ...         print(e.line)
    second SIGINT: stopped at once, abandoning the checkpoint being written; the last good \
checkpoint is /run/checkpoints/12: run the same command to resume from it

    Args:
      signals: the signals that request a stop.
      on_second: ``"raise"`` or ``"exit"``: what a second signal does (see above).
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        *,
        on_second: str = "raise",
    ):
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise ValueError("signals must name at least one signal, e.g. (signal.SIGTERM,)")
        if on_second not in ("raise", "exit"):
            raise ValueError(f"on_second must be 'raise' or 'exit', got {on_second!r}")
        self.on_second = on_second
        self.signum: int | None = None
        #: The newest checkpoint known to be complete (what :meth:`checkpointed` was told).
        self.last_checkpoint: str | None = None
        self._saving = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """``"SIGTERM"`` / ``"SIGINT"`` for the first signal received, else ``None``."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def checkpointed(self, where: str) -> None:
        """Record ``where`` (e.g. ``".../checkpoints/12"``) as the last good checkpoint: call
        it after a checkpoint is restored and after each one is written."""
        self.last_checkpoint = str(where)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Mark a checkpoint write: a second signal inside says it abandoned one."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def stop_now_line(self, signum: int) -> str:
        """The one line a second ``signum`` prints."""
        what = "abandoning the checkpoint being written" if self._saving else "mid-step"
        if self.last_checkpoint is None:
            where = "no checkpoint was written yet: run the same command to start again"
        else:
            where = (
                f"the last good checkpoint is {self.last_checkpoint}: run the same command to "
                "resume from it"
            )
        return f"second {signal.Signals(signum).name}: stopped at once, {what}; {where}"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            # stderr, not logging: a handler may run while a logging lock is held.
            os.write(
                2, f"received {signal.Signals(signum).name}: stopping after this step\n".encode()
            )
            return
        line = self.stop_now_line(signum)
        if self.on_second == "exit":
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # e.g. a reentrant call mid-print
                    stream.flush()
            os.write(2, (line + "\n").encode())
            os._exit(128 + signum)
        raise StopNow(line, signum=signum, last_checkpoint=self.last_checkpoint)

    def agreed(self) -> bool:
        """Whether any process has been asked to stop (a collective with several processes;
        every process must call it at the same steps)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignals must be entered in the main thread (signal handlers)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
