"""A checkpoint's files on disk: the OS fault of a failed write, what it leaves, what nothing reads.

- :func:`os_error`: the ``(errno, reason)`` of a failed write (OSError or TensorStore's text),
  :data:`ADVICE` what the user can do about it; :func:`remove_settled` removes orbax's
  temporary folder of a failed write once TensorStore has stopped writing into it;
- :func:`logs_held_back`: orbax's log records of a write, replayed if it succeeds, dropped if
  it fails (the caller raises one line instead);
- :func:`unreferenced_files`: the files of a merged OCDBT checkpoint that nothing references.

The checkpointer (:mod:`contrastive.run.checkpoint`) uses them around each save and resume.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import tensorstore as ts

from contrastive.run.orbax_logs import silence_restore_stragglers


class CheckpointCorruptError(RuntimeError):
    """One checkpoint cannot be used: unreadable, incomplete or its digest differs."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written because of a disk fault (one-line message).

    The message names the step, the directory, the OS reason and the newest checkpoint left
    on disk, e.g. ``step 8: writing the checkpoint to /w/checkpoints failed (No space left on
    device); checkpoint 4 is intact: free space and run the same command to resume``. Nothing
    of the failed write is left where orbax would find it.
    """


# --- disk faults during a write ------------------------------------------------------------

# TensorStore reports a failed file write as a ValueError whose text ends in
# "[os_error_code='28']"; orbax's Python writes raise OSError, and wrappers may keep only
# its text ("[Errno 28] No space left on device").
OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")

# What the user can do about each kind of fault, for the last clause of the message.
ADVICE = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space (or raise the quota)",
    errno.EROFS: "make the file system writable",
    errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable",
}

ORBAX_TMP = ".orbax-checkpoint-tmp"


def remove_settled(path: str, *, settle_s: float = 0.2, limit_s: float = 5.0) -> None:
    """Remove the folder ``path`` and keep removing it until it stays away for ``settle_s``.

    When a write fails orbax closes its event loop, but TensorStore still completes the writes
    already under way, re-creating files in the folder for a moment. What appears later than
    ``limit_s`` is left to orbax, which ignores temporary folders and removes them when the
    next run starts.
    """
    start = time.monotonic()
    gone_since: float | None = None
    while time.monotonic() - start < limit_s:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= settle_s:
            return
        time.sleep(0.02)


def join_orbax_threads(*, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) for orbax's worker threads of a failed write to end."""
    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        # orbax's `_SignalingThread` (a private class, so matched by name) runs each handler's
        # part of a write and logs the error it ends with. Its own `join` re-raises that
        # error; the plain Thread.join only waits.
        if type(t).__name__ == "_SignalingThread" and t is not threading.current_thread():
            threading.Thread.join(t, max(deadline - time.monotonic(), 0.0))


def os_error(e: BaseException | None) -> tuple[int | None, str] | None:
    """``(errno, reason)`` when ``e`` (or an exception it was raised from) is an OS error.

    >>> os_error(OSError(errno.ENOSPC, "No space left on device", "/w/d/1f"))
    (28, 'No space left on device')
    >>> os_error(ValueError("RESOURCE_EXHAUSTED: Failed writing ... [os_error_code='122']"))
    (122, 'Disk quota exceeded')
    >>> os_error(KeyError("w")) is None
    True
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno or e.strerror):
            return e.errno, e.strerror or os.strerror(e.errno)
        m = OS_ERROR_CODE.search(str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return code, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


_ORBAX_LOGGERS = ("absl", "orbax", "asyncio", "jax._src.distributed")


class _Hold(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


class _DropUnretrievedDiskFaults(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of an OS error: after a failed
    write, the tasks that orbax left with the same fault report it again when collected,
    possibly as late as the interpreter's exit."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage():
            return True
        return os_error(record.exc_info[1] if record.exc_info else None) is None


def drop_unretrieved_disk_faults() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropUnretrievedDiskFaults) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropUnretrievedDiskFaults())


@contextlib.contextmanager
def logs_held_back() -> Iterator[None]:
    """Hold orbax's log records during a write: replayed if it succeeds, dropped if it fails.

    A failed TensorStore write makes orbax log the same traceback from each of its threads
    (pages of text); the caller raises one line instead. The "Event loop is closed" reports
    that TensorStore's late callbacks leave are dropped by the hook of
    :mod:`contrastive.run.orbax_logs`.
    """
    silence_restore_stragglers()
    hold = _Hold()
    loggers = [logging.getLogger(n) for n in _ORBAX_LOGGERS]
    for lg in loggers:
        lg.addFilter(hold)
    ok = False
    try:
        yield
        ok = True
    finally:
        for lg in loggers:
            lg.removeFilter(hold)
        if ok:
            for record in hold.records:
                logging.getLogger(record.name).handle(record)


# --- files no checkpoint references ---------------------------------------------------------
#
# An OCDBT database (TensorStore's key-value store that orbax writes arrays into) is a
# directory: ``manifest.ocdbt`` lists the versions (a root b-tree node each, older ones in
# version-tree nodes), and b-tree nodes and values lie at (file, offset, length) in data files
# under ``d/``. A location reads ``<kind>:<base path>:<relative path>:<offset>:<length>``, the
# file being ``<database>/<base path><relative path>``; the root database that orbax merges
# the per-process ones into refers to their value files with the base path
# ``ocdbt.process_<i>/``. Everything a restore can read is reachable from the root manifest.

_LOCATION = re.compile(r"^(btreenode|versionnode|value):(.*):(\d+):(\d+)$")


def _referenced_files(db: str) -> set[str]:
    """Every file that the OCDBT database in directory ``db`` refers to, by walking its
    manifest, version-tree nodes, b-tree nodes and value references (all of its versions)."""
    base = ts.KvStore.open({"driver": "file", "path": db.rstrip("/") + "/"}).result()
    files: set[str] = set()
    seen: set[str] = set()
    todo: list[Any] = [ts.ocdbt.dump(base).result()]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, str):
            m = _LOCATION.match(node)
            if m is None or node in seen:
                continue
            seen.add(node)
            kind, file_id = m.group(1), m.group(2)
            base_path, _, relative = file_id.partition(":")
            files.add(os.path.normpath(os.path.join(db, base_path + relative)))
            if kind != "value":  # a node: what it points at is referenced too
                todo.append(ts.ocdbt.dump(base, node).result())
    return files


def _ocdbt_databases(step_dir: str) -> list[str]:
    """The root OCDBT databases of a checkpoint: its item folders with a ``manifest.ocdbt``."""
    return [
        os.path.join(step_dir, item)
        for item in sorted(os.listdir(step_dir))
        if os.path.isfile(os.path.join(step_dir, item, "manifest.ocdbt"))
    ]


def _files_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, f))
    ]


def unreferenced_files(step_dir: str | os.PathLike) -> list[str]:
    """The files of checkpoint folder ``step_dir`` that no restore of it can read, sorted.

    These are, in each root OCDBT database (``<step>/state``), the data files under ``d/``
    and ``ocdbt.process_<i>/d/`` that no location reachable from the root manifest names, and
    the per-process manifests ``ocdbt.process_<i>/manifest.ocdbt`` that the merge superseded.
    Only files in those ``d/`` folders and those manifests are ever listed.

    Raises (and so lists nothing) when a database cannot be walked, or when a file it refers
    to is missing: a damaged checkpoint is left exactly as it is, for
    :meth:`Checkpointer.restore_latest` to report.
    """
    step_dir = os.fspath(step_dir)
    out: list[str] = []
    for db in _ocdbt_databases(step_dir):
        if any(f.startswith("manifest.") and f != "manifest.ocdbt" for f in os.listdir(db)):
            continue  # numbered manifests: a layout orbax does not write; leave it alone
        referenced = _referenced_files(db)
        missing = sorted(f for f in referenced if not os.path.isfile(f))
        if missing:
            raise CheckpointCorruptError(f"{missing[0]} is referenced but missing")
        candidates = _files_in(os.path.join(db, "d"))
        for sub in sorted(os.listdir(db)):
            if sub.startswith("ocdbt.process_") and os.path.isdir(os.path.join(db, sub)):
                candidates += _files_in(os.path.join(db, sub, "d"))
                manifest = os.path.join(db, sub, "manifest.ocdbt")
                if os.path.isfile(manifest):
                    candidates.append(manifest)
        out += [f for f in candidates if os.path.normpath(f) not in referenced]
    return sorted(out)
