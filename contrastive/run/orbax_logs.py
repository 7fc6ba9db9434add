"""Quieting orbax on a failed restore: one line from the caller, not pages of tracebacks.

A failed TensorStore read makes orbax, asyncio and absl log multi-line reports, some of them
late and from other threads; :func:`quiet` (a context manager) and the unraisable-hook filter
it installs drop exactly those, and :func:`one_line` turns the exception into the one line the
checkpointer logs instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp

__all__ = ["quiet", "one_line"]

# --- quieting orbax on a failed restore ----------------------------------------------------


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence orbax's and asyncio's multi-line logging while a checkpoint is tried.

    A failed TensorStore read leaves orbax's event loop with pending tasks, which log
    "Event loop is closed" tracebacks; the one-line reason is logged by the caller instead.
    """
    silence_restore_stragglers()
    names = ["absl", "orbax", "asyncio", "jax._src.distributed"]
    loggers = [logging.getLogger(n) for n in names]
    drop = _DropAll()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


_ORBAX_DIR = os.path.dirname(ocp.__file__)


def _is_restore_straggler(u: Any) -> bool:
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
        return True
    code = getattr(u.object, "cr_code", None)  # a coroutine of orbax's, never awaited to the end
    return code is not None and code.co_filename.startswith(_ORBAX_DIR)


def silence_restore_stragglers() -> None:
    """Drop the tracebacks that a failed restore leaves behind, from then on.

    After a failed read orbax closes its event loop while TensorStore still completes the
    other reads of that restore; each completion reports ``RuntimeError('Event loop is
    closed')``, and each unfinished read coroutine its own error, through
    ``sys.unraisablehook``, from other threads and possibly after the restore has returned
    (hundreds of lines). The hook installed here (at the first restore, for good, since the
    reports come late) drops exactly these and passes every other report to the hook that
    was in place.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_restore_stragglers", False):
        return

    def hook(u: Any) -> None:
        if not _is_restore_straggler(u):
            previous(u)

    hook.drops_restore_stragglers = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}"
