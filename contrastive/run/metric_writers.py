"""TensorBoard event files for a training run that may be killed and resumed at any moment.

:class:`TensorBoardWriter` writes scalars (and the run's config as text) through tensorboardX
into ``logdir[/run_name]/events.out.tfevents.*``, one event file per session, every write
flushed and fsynced before it returns. Only process 0 of a multi-process run writes; every
other process gets a writer that checks its input and writes nothing.

**Resume without duplicates.** A run resumed from checkpoint step ``s`` will log steps
``s+1, s+2, ...`` again, but the killed session may already have written some of them (it
logged past its last checkpoint). Opening the writer with ``resume_from_step=s`` therefore
reads every event file of the run with TensorBoard's own reader
(:class:`tensorboard.backend.event_processing.event_file_loader.EventFileLoader`) and, when
any of them holds a step ``> s`` or bytes it cannot read (a record torn by a kill mid-write),
rewrites the events of steps ``<= s`` into one fresh event file and removes the old files.
The config text written at the start of a session, at the step the session starts from, is
dropped from the rewrite at step ``s`` too: the resumed session writes it again.

**A kill at any moment loses nothing finished and leaves no duplicate.** The rewrite goes:

1. write the kept events into ``compacting.sNNNNNN.partial`` (no ``tfevents`` in the name,
   so TensorBoard ignores it), flush, fsync;
2. rename it to ``compacting.sNNNNNN.ready`` and fsync the directory: the commit point;
3. delete the old event files, fsync the directory;
4. rename the ready file to ``events.out.tfevents.<time>.<host>.sNNNNNN``, fsync.

Killed in 1: the old files are whole and the partial file is deleted by the next open,
which starts over. Killed after 2: the ready file holds every kept event; the next open
finishes steps 3-4 before it reads anything (any ``tfevents`` file beside a ready file is
an old one: new files are created only after step 4). TensorBoard never sees the kept
events twice: they are visible either in the old files or in the renamed one, never both
(between 3 and 4, or after a kill there, they are briefly not visible at all, until the
resumed run's open completes step 4).

**Torn records.** A record cut short by a kill (or a disk filling up) ends the file for the
reader; the rewrite keeps every whole record before it and drops the rest.

Typical use in a training loop (``start`` the step restored from the checkpoint, 0 if
none)::

    tb = TensorBoardWriter(f"{workdir}/tensorboard", resume_from_step=start, run_name="train")
    tb.write_text("config", "<pre>" + json.dumps(cfg.identity(), indent=1) + "</pre>")
    for step in range(start + 1, num_steps + 1):
        ...
        tb.write_scalars(step, {"loss": loss, "temperature": t})
    tb.close()

>>> import tempfile
>>> logdir = tempfile.mkdtemp()
>>> with TensorBoardWriter(logdir, resume_from_step=0, process_index=0) as tb:
...     tb.write_scalars(1, {"loss": 2.5})
...     tb.write_scalars(2, {"loss": 2.25})
>>> with TensorBoardWriter(logdir, resume_from_step=1, process_index=0) as tb:  # killed after 1
...     tb.write_scalars(2, {"loss": 2.0})
>>> read_scalars(logdir)
{'loss': [(1, 2.5), (2, 2.0)]}
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from numbers import Real
from typing import Any

from contrastive.run.run_guard import current_process_index, fsync_dir

__all__ = ["TensorBoardWriter", "event_files", "read_events", "read_scalars"]

log = logging.getLogger(__name__)

_TFEVENTS = "tfevents"  # what TensorBoard looks for in a file name
_SEQ = re.compile(r"\.s(\d{6})$")  # the session number ending our event files' names
_COMPACTING = re.compile(r"^compacting\.s(\d{6})\.(partial|ready)$")
_TEXT_PLUGIN = "text"


def event_files(path: str | os.PathLike) -> list[str]:
    """The event files of the run in ``path``, in the order TensorBoard reads them (by name)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    names = [n for n in os.listdir(path) if _TFEVENTS in n]
    return [os.path.join(path, n) for n in sorted(names) if os.path.isfile(os.path.join(path, n))]


def _readable_records(path: str) -> tuple[int, int]:
    """``(whole records, bytes they span)`` at the start of the TFRecord file ``path``.

    A record is ``uint64 length, uint32 masked crc32c(length), data, uint32 masked
    crc32c(data)`` (little-endian). The scan stops at the first record that is cut short or
    fails a checksum: that is where TensorBoard's reader stops too.
    """
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    count = offset = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            break
        body = data[offset + 12 : offset + 12 + length]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc32c(body):
            break
        count, offset = count + 1, end
    return count, offset


def read_events(path: str | os.PathLike) -> Iterator[Any]:
    """Every event (``tensorboard.compat.proto.event_pb2.Event``) of one event file, as
    TensorBoard reads it: stops quietly at a torn or corrupt record."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    yield from EventFileLoader(os.fspath(path)).Load()


def _value_of(value: Any) -> float:
    if value.HasField("tensor"):
        from tensorboard.util import tensor_util

        return float(tensor_util.make_ndarray(value.tensor).reshape(()))
    return float(value.simple_value)


def read_scalars(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the run directory ``path``, in the
    order TensorBoard reads them (file by file, by name, then in file order)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in event_files(path):
        for event in read_events(f):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars" or v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), _value_of(v)))
    return out


class TensorBoardWriter:
    """Scalars and text for TensorBoard, written by process 0 only, safe to kill and resume.

    See the module docstring for how a resume rewrites the event files and why a kill at any
    moment, the rewrite included, loses nothing finished and duplicates nothing.

    Every :meth:`write_scalars` and :meth:`write_text` call is flushed and fsynced before it
    returns, so whatever the loop logged before it saved a checkpoint is on disk with it.

    Args:
      logdir: the TensorBoard log directory (``tensorboard --logdir`` it); created if missing.
      resume_from_step: the checkpoint step the run resumes from (0 for a fresh run of a
        checkpointed loop): events of later steps already on disk are removed. ``None``:
        keep every event already there (a run that does not resume from checkpoints).
      run_name: the run's subdirectory of ``logdir`` (its name in TensorBoard); ``None``
        writes into ``logdir`` itself.
      process_index: which process of a multi-process run this is; ``None`` asks
        ``jax.process_index()``. Only process 0 touches the disk.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        resume_from_step: int | None,
        run_name: str | None = None,
        process_index: int | None = None,
    ):
        if resume_from_step is not None and (
            not isinstance(resume_from_step, int)
            or isinstance(resume_from_step, bool)
            or resume_from_step < 0
        ):
            raise ValueError(
                f"resume_from_step must be None or an int >= 0, got {resume_from_step!r}"
            )
        if run_name is not None and (
            not isinstance(run_name, str) or not run_name or os.sep in run_name
        ):
            raise ValueError(f"run_name must be a non-empty name without '/', got {run_name!r}")
        if process_index is not None and (not isinstance(process_index, int) or process_index < 0):
            raise ValueError(f"process_index must be an int >= 0, got {process_index!r}")
        index = current_process_index() if process_index is None else process_index
        self.resume_from_step = resume_from_step
        self.enabled = index == 0
        base = os.path.abspath(os.fspath(logdir))
        #: The directory holding this run's event files.
        self.path = os.path.join(base, run_name) if run_name else base
        #: This session's event file (``None`` on processes other than 0).
        self.file: str | None = None
        self._last: dict[str, int] = {}  # tag -> last step written this session
        self._writer: Any = None
        if self.enabled:
            os.makedirs(self.path, exist_ok=True)
            seq = self._prepare()
            from tensorboardX.event_file_writer import EventsWriter

            suffix = f".s{seq:06d}"
            self._writer = EventsWriter(os.path.join(self.path, "events"), suffix)
            self._writer.flush()  # the file_version record, so the file is whole at once
            self.file = next(f for f in event_files(self.path) if f.endswith(suffix))

    # --- opening: recover, then drop what a resumed run will write again ----------------

    def _prepare(self) -> int:
        """Finish or discard an interrupted rewrite, rewrite if needed; the next session
        number."""
        seq = self._recover()
        files = event_files(self.path)
        if files:
            try:
                import tensorboard  # noqa: F401 - its reader checks what is on disk
            except ImportError:
                raise ImportError(
                    f"{self.path} holds event files: resuming them needs TensorBoard's reader: "
                    "pip install tensorboard"
                ) from None
        seq = max([seq, *(int(m.group(1)) for f in files if (m := _SEQ.search(f)))])
        kept: list[bytes] = []
        dropped = torn = 0
        for f in files:
            count, whole = _readable_records(f)
            read = 0
            for event in read_events(f):
                read += 1
                out = self._keep(event)
                if out is None:
                    dropped += 1
                elif out is not False:
                    kept.append(out)
            # Bytes past the last whole record: a tail torn by a kill, or a corrupt record
            # (the reader stops there, so nothing after it was ever visible).
            if whole != os.path.getsize(f) or read < count:
                torn += 1
        if dropped or torn:
            log.info(
                "%s: rewriting the event files without %d event(s) past step %s%s",
                self.path,
                dropped,
                self.resume_from_step,
                f" and {torn} torn file tail(s)" if torn else "",
            )
            seq += 1
            self._rewrite(kept, files, seq)
        return seq + 1

    def _keep(self, event: Any) -> bytes | bool | None:
        """The serialised event to keep; ``None`` to drop it (past the resume step);
        ``False`` for a record every file has of its own (the file version)."""
        if event.HasField("file_version"):
            return False
        s = self.resume_from_step
        if s is None:
            return event.SerializeToString()
        if event.step > s:
            return None
        if event.HasField("summary"):
            values = [
                v
                for v in event.summary.value
                # The text a session writes at its start step is written again on resume.
                if not (v.metadata.plugin_data.plugin_name == _TEXT_PLUGIN and event.step >= s)
            ]
            if not values:
                return None
            if len(values) != len(event.summary.value):
                del event.summary.value[:]
                event.summary.value.extend(values)
        return event.SerializeToString()

    def _recover(self) -> int:
        """Finish a rewrite that was committed (a ready file), discard one that was not."""
        seq = 0
        ready: list[tuple[int, str]] = []
        for name in os.listdir(self.path):
            m = _COMPACTING.match(name)
            if not m:
                continue
            seq = max(seq, int(m.group(1)))
            if m.group(2) == "partial":
                os.remove(os.path.join(self.path, name))  # never committed: old files are whole
            else:
                ready.append((int(m.group(1)), name))
        if ready:
            ready.sort()
            for _, name in ready[:-1]:  # cannot happen (each open recovers first); be safe
                os.remove(os.path.join(self.path, name))
            n, name = ready[-1]
            self._finish(os.path.join(self.path, name), event_files(self.path), n)
        return seq

    def _rewrite(self, kept: list[bytes], old: list[str], seq: int) -> None:
        from tensorboardX.proto import event_pb2
        from tensorboardX.record_writer import RecordWriter

        partial = os.path.join(self.path, f"compacting.s{seq:06d}.partial")
        writer = RecordWriter(partial)
        try:
            header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            writer.write(header.SerializeToString())
            for record in kept:
                writer.write(record)
            writer.flush()  # flushes and fsyncs
        finally:
            writer.close()
        ready = os.path.join(self.path, f"compacting.s{seq:06d}.ready")
        os.replace(partial, ready)
        fsync_dir(self.path)  # committed: from here the ready file is the truth
        self._finish(ready, old, seq)

    def _finish(self, ready: str, old: list[str], seq: int) -> None:
        for f in old:
            os.remove(f)
        fsync_dir(self.path)
        name = f"events.out.{_TFEVENTS}.{int(time.time())}.{socket.gethostname()}.s{seq:06d}"
        os.replace(ready, os.path.join(self.path, name))
        fsync_dir(self.path)

    # --- writing ---------------------------------------------------------------------------

    def _check_step(self, step: int, tags: list[str]) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        s = self.resume_from_step
        if s is not None and step <= s:
            raise ValueError(
                f"step {step} is not after the resume step {s}: its scalars are on disk "
                "already; write steps > resume_from_step"
            )
        for tag in tags:
            if step <= self._last.get(tag, -1):
                raise ValueError(
                    f"step {step} of {tag!r} is not after its last written step "
                    f"{self._last[tag]}: write each step of a tag once, in order"
                )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write ``{tag: number}`` at ``step`` (one event), flushed and fsynced.

        Numbers are Python/NumPy reals or 0-d arrays (stored as float32, as TensorBoard
        does); NaN and Inf are written as they are. Each tag's steps must increase and be
        after ``resume_from_step``.
        """
        if not isinstance(scalars, Mapping):
            raise ValueError(f"scalars must be a dict of tag -> number, got {type(scalars)}")
        values: dict[str, float] = {}
        for tag, v in scalars.items():
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"scalar tags must be non-empty strings, got {tag!r}")
            try:
                x = float(v) if isinstance(v, Real) and not isinstance(v, bool) else _as_float(v)
            except (TypeError, ValueError):
                raise ValueError(
                    f"scalar {tag!r} must be a number, got {type(v).__name__} {v!r:.60}"
                ) from None
            values[tag] = x
        self._check_step(step, list(values))
        if not self.enabled or not values:
            return
        from tensorboardX.proto import event_pb2, summary_pb2

        event = event_pb2.Event(wall_time=time.time(), step=step)
        for tag, x in values.items():
            # The tag as given: tensorboardX's summary.scalar would rename ``i2t_r@1`` to
            # ``i2t_r_1`` (TF op-name rules), and the board must use metrics.jsonl's names.
            event.summary.value.append(summary_pb2.Summary.Value(tag=tag, simple_value=x))
        self._write(event)
        for tag in values:
            self._last[tag] = step

    def write_text(self, tag: str, text: str) -> None:
        """Write ``text`` (markdown; e.g. the run's config) under ``tag`` at the step the
        session starts from (``resume_from_step``, 0 if ``None``)."""
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty string, got {tag!r}")
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if not self.enabled:
            return
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        step = self.resume_from_step or 0
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary.text(tag, text))
        self._write(event)

    def _write(self, event: Any) -> None:
        if self._writer is None:
            raise ValueError(f"the TensorBoard writer of {self.path} is closed")
        self._writer.write_event(event)
        self._writer.flush()  # tensorboardX's RecordWriter.flush also fsyncs

    def flush(self) -> None:
        """Flush and fsync (every write already does; for symmetry with other writers)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_float(v: Any) -> float:
    """A NumPy/JAX scalar or 0-d array as a float; TypeError for anything else."""
    import numpy as np

    a = np.asarray(v)
    if a.shape != () or a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"not a real number: {v!r}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"not a real number: {v!r}")
    return float(a)
