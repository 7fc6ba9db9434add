"""Verified checkpoints with orbax: save every N steps, keep the last k, resume from the newest
checkpoint that is intact.

A checkpoint ``workdir/checkpoints/<step>`` holds three items:

- ``state``: any PyTree of arrays (parameters, optimiser state, PRNG keys, step), saved
  with ``StandardSave`` and restored into the shardings of a template, so a sharded train
  state comes back sharded;
- ``meta``: a small JSON dict (step, data-iterator position, seed, config) that says where
  the run was;
- ``integrity``: a digest of every leaf of ``state`` and of ``meta``, computed when the
  checkpoint was written and checked after every restore
  (:func:`contrastive.run.state_digest.state_digest`).

Five guarantees:

1. **Atomic.** orbax writes each step into a temporary folder and renames it when complete,
   so a run killed at any moment leaves only whole checkpoints.
2. **Verified, with fallback.** :meth:`Checkpointer.restore_latest` restores the newest
   checkpoint and compares its digests with the saved ones; on any failure (orbax/TensorStore
   error, missing or truncated file, digest mismatch) it logs one line naming the step and the
   reason and tries the next older one. Nothing is deleted: unusable checkpoints newer than the
   restored one are moved to ``workdir/checkpoints_unusable/`` (orbax would otherwise never
   save those steps again, since it skips steps at or below its latest one).
3. **Only finite states are saved.** :meth:`Checkpointer.save` refuses a state with a NaN or
   Inf in any floating-point leaf (:class:`NonFiniteStateError`). Rotation (keep the last k)
   only ever deletes a checkpoint when a newer one is written, so refusing non-finite writes
   is what guarantees that the newest finite checkpoint is never rotated out by a diverged run.
4. **A failed write leaves the older checkpoints as they were.** A disk fault while a
   checkpoint is written (disk full, quota, I/O error, read-only file system) ends
   :meth:`Checkpointer.save` with a one-line :class:`CheckpointWriteError` naming the step, the
   directory and the OS reason. What the write had put on disk (orbax's
   ``<step>.orbax-checkpoint-tmp`` folder) is removed, so its space is free again and no
   half-written step is ever restored; a folder left by a killed run is removed when the next
   run starts. The older checkpoints are untouched: orbax's rotation runs only after a
   complete write.
5. **No unreferenced files.** orbax writes each process's arrays into its own OCDBT database
   (``<step>/state/ocdbt.process_<i>/``) and then merges them into the root database
   (``<step>/state/manifest.ocdbt`` and ``d/``). The merged tree points at the per-process
   *value* files, but the per-process manifests and b-tree nodes (one per commit of the
   per-process database) are superseded. After every save and every resume those files, found
   by walking the root database's version tree, b-tree nodes and value references
   (:func:`unreferenced_files`), are deleted; nothing a restore reads is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from contrastive.run.checkpoint_disk import (
    ADVICE,
    ORBAX_TMP,
    CheckpointCorruptError,
    CheckpointWriteError,
    drop_unretrieved_disk_faults,
    join_orbax_threads,
    logs_held_back,
    os_error,
    remove_settled,
    unreferenced_files,
)
from contrastive.run.hosts import all_processes, sync
from contrastive.run.orbax_logs import one_line, quiet
from contrastive.run.state_digest import (
    abstract_of,
    digests_and_nonfinite,
    keys_to_data,
    meta_digest,
    rewrap_keys,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointWriteError",
    "Checkpointer",
    "NoUsableCheckpointError",
    "NonFiniteStateError",
    "unreferenced_files",
]

log = logging.getLogger(__name__)

UNUSABLE_DIR = "checkpoints_unusable"


class NonFiniteStateError(ValueError):
    """A save was refused because the state holds NaN or Inf (one-line message)."""


class NoUsableCheckpointError(RuntimeError):
    """The work dir holds checkpoints but none of them can be restored (one-line message)."""


# --- the checkpointer ----------------------------------------------------------------------


class Checkpointer:
    """Periodic, keep-last-k, verified checkpoints of a train state in ``workdir/checkpoints``.

    Usage::

        ckpt = Checkpointer(workdir, every=100, keep=3)
        state, meta, step = ckpt.restore_latest(state)   # newest intact checkpoint, if any
        for step in range(meta.get("step", 0), num_steps):
            ...
            ckpt.maybe_save(step + 1, state, {"step": step + 1, "data": it.get_state()})
        ckpt.close()

    ``step`` numbers the *completed* steps: a checkpoint at step ``s`` resumes at step ``s``.
    In a multi-process run every process makes the same calls (saves and restores are
    collective); only process 0 moves unusable checkpoints aside.

    Raises (all with one-line messages): :class:`NonFiniteStateError` and
    :class:`CheckpointWriteError` from :meth:`save` (the latter also from :meth:`close` when an
    asynchronous write failed), :class:`CheckpointCorruptError` from :meth:`read_meta` /
    :meth:`restore`, :class:`NoUsableCheckpointError` from :meth:`restore_latest`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every: int,
        keep: int = 3,
        async_save: bool = False,
    ):
        if every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 step, got {every}")
        if keep < 1:
            raise ValueError(f"must keep at least 1 checkpoint, got {keep}")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.unusable_directory = os.path.join(self.workdir, UNUSABLE_DIR)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            # Synchronous by default: the per-step wall time stays honest and a SIGKILL right
            # after `save` returns cannot lose the checkpoint.
            enable_async_checkpointing=async_save,
            # What a killed run or a failed write left (`<step>.orbax-checkpoint-tmp`) is
            # removed at start: on a full disk, that space is what the next run needs.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta", "integrity"), options=options
        )
        #: ``[(step, reason)]`` of the checkpoints the last :meth:`restore_latest` skipped.
        self.skipped: list[tuple[int, str]] = []
        self._async = async_save
        self._in_flight: int | None = None  # the step of an asynchronous write not waited for
        self._write_failed = False
        self._cleaned: set[int] = set()  # steps whose unreferenced files are removed

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (not necessarily intact), or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` and ``meta`` as checkpoint ``step``; True if one was written.

        Raises :class:`NonFiniteStateError` (nothing written) when a floating-point leaf of
        ``state`` holds NaN or Inf: see guarantee 3 in the module docstring.
        """
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(meta))  # exactly what JsonRestore will give back
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta must be a dict of JSON values: {e}") from None
        if not force and not self._manager.should_save(step):
            return False  # orbax would skip it (off the interval, or not after the latest)
        digests, bad = digests_and_nonfinite(state)
        if bad:
            more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
            raise NonFiniteStateError(
                f"checkpoint {step} not written: state{bad[0]}{more} holds NaN or Inf; "
                f"the older checkpoints in {self.directory} are kept"
            )
        integrity = {"state": digests, "meta": meta_digest(meta)}
        self._wait_for_write_in_flight()
        saved = self._write(
            step,
            lambda: self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(keys_to_data(state)),
                    meta=ocp.args.JsonSave(meta),
                    integrity=ocp.args.JsonSave(integrity),
                ),
                force=force,
            ),
        )
        if saved and self._async:
            self._in_flight = step
        self._remove_unreferenced()  # orbax has rotated: the kept checkpoints only
        return bool(saved)

    def _write(self, step: int, write: Callable[[], Any]) -> Any:
        """``write()`` (of checkpoint ``step``); a disk fault becomes :class:`CheckpointWriteError`
        after what it left on disk is removed. Other errors propagate, after the same cleanup."""
        # The clean-up runs while the logs are still held: orbax's other threads of this write
        # log their own copy of the error as they end, which is after `write()` has raised.
        with logs_held_back():
            try:
                return write()
            except Exception as e:
                join_orbax_threads(timeout_s=10.0)
                fault = os_error(e)
                self._discard(step)
                if fault is None:
                    raise
                drop_unretrieved_disk_faults()
                self._write_failed = True
                raise CheckpointWriteError(self._write_failure(step, *fault)) from None

    def _wait_for_write_in_flight(self) -> None:
        if self._in_flight is not None:
            step, self._in_flight = self._in_flight, None
            self._write(step, self._manager.wait_until_finished)

    def _discard(self, step: int) -> None:
        """Remove orbax's temporary folder of the failed write of ``step``.

        A folder renamed into place is complete (the rename is orbax's last act) and is kept.
        """
        if jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}{ORBAX_TMP}"):
                    remove_settled(os.path.join(self.directory, name))
        self._manager.reload()

    def _write_failure(self, step: int, code: int | None, reason: str) -> str:
        previous = self._manager.latest_step()
        advice = ADVICE.get(code, "check the disk")
        head = f"step {step}: writing the checkpoint to {self.directory} failed ({reason}); "
        if previous is None:
            return head + f"no earlier checkpoint exists: {advice} and run the same command"
        again = "run the same command to resume"
        return head + f"checkpoint {previous} is intact: {advice} and {again}"

    def _remove_unreferenced(self) -> None:
        """Delete the files no kept checkpoint references (:func:`unreferenced_files`), in
        each kept checkpoint not yet cleaned by this process; only process 0 deletes."""
        if jax.process_index() != 0:
            return
        steps = set(self._manager.all_steps())
        if self._in_flight is not None:
            steps.discard(self._in_flight)  # still being written
        self._cleaned &= steps
        for step in sorted(steps - self._cleaned):
            self._cleaned.add(step)
            try:
                files = unreferenced_files(os.path.join(self.directory, str(step)))
            except Exception as e:  # a damaged checkpoint: left as it is for restore to report
                log.warning("checkpoint %d: unreferenced files not removed (%s)", step, one_line(e))
                continue
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f)

    def maybe_save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Save when ``step`` is a multiple of ``every``."""
        if not self.should_save(step):
            return False
        return self.save(step, state, meta)

    def _read_item(self, step: int, item: str, args: Any) -> Any:
        """Item ``item`` of checkpoint ``step``, read by its orbax handler alone.

        Not through ``CheckpointManager.restore``, which ends in a barrier (a collective): a
        process whose read raised (a damaged file that only its shards live in) would skip that
        barrier while its peers wait in it, and its next collective
        (:func:`~contrastive.run.hosts.all_processes`) would meet their barrier; gloo aborts on
        the mismatch ("Received data size doesn't match expected size"). A handler holds no
        barrier, so every process reaches the agreement that follows each read, whatever its
        own read did.
        """
        if isinstance(args, ocp.args.StandardRestore):
            handler = ocp.StandardCheckpointHandler()
        else:
            handler = ocp.JsonCheckpointHandler()
        try:
            return handler.restore(Path(self.directory, str(step), item), args=args)
        finally:
            handler.close()

    def _read_meta(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if step not in self._manager.all_steps():
            raise CheckpointCorruptError(f"checkpoint {step} does not exist in {self.directory}")
        try:
            with quiet():
                meta = self._read_item(step, "meta", ocp.args.JsonRestore())
                integrity = self._read_item(step, "integrity", ocp.args.JsonRestore())
        except Exception as e:
            raise CheckpointCorruptError(f"meta unreadable: {one_line(e)}") from e
        if not isinstance(meta, dict) or not isinstance(integrity, dict):
            raise CheckpointCorruptError("meta or integrity record missing")
        if not isinstance(integrity.get("state"), dict) or "meta" not in integrity:
            raise CheckpointCorruptError("integrity record incomplete")
        if meta_digest(meta) != integrity["meta"]:
            raise CheckpointCorruptError("meta differs from the one saved (digest mismatch)")
        return dict(meta), integrity

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta dict of checkpoint ``step``, verified, without restoring the state.

        Raises :class:`CheckpointCorruptError` when it is missing, unreadable or altered.
        """
        return self._read_meta(step)[0]

    def _restore_verified(self, step: int, template: Any, integrity: dict[str, Any]) -> Any:
        """Restore and verify the state of ``step`` (collective in a multi-process run)."""
        stored: Any = None
        reason = ""
        try:
            with quiet():
                stored = self._read_item(
                    step, "state", ocp.args.StandardRestore(abstract_of(template))
                )
            if stored is None:
                reason = "state item missing"
        except Exception as e:
            reason = f"state unreadable: {one_line(e)}"
        # Every process must take the same branch before the (collective) digest.
        if not all_processes(not reason):
            raise CheckpointCorruptError(reason or "state unreadable on another process")
        try:
            got, _ = digests_and_nonfinite(stored)
        except Exception as e:  # e.g. a restored tree that does not match the template
            raise CheckpointCorruptError(f"state unusable: {one_line(e)}") from e
        want = integrity["state"]
        if set(got) != set(want):
            raise CheckpointCorruptError(
                f"state leaves differ from the saved ones: {sorted(set(got) ^ set(want))[:3]}"
            )
        bad = [p for p in want if got[p] != want[p]]
        if bad:
            more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
            raise CheckpointCorruptError(
                f"digest of state{bad[0]}{more} differs from the saved one"
            )
        return rewrap_keys(stored, template)

    def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """Checkpoint ``step`` restored with the structure, dtypes and shardings of ``template``,
        verified against its digests; raises :class:`CheckpointCorruptError` if it is unusable.
        """
        meta, integrity = self._read_meta(step)
        return self._restore_verified(step, template, integrity), meta

    def restore_latest(
        self,
        template: Any,
        *,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Any, dict[str, Any], int | None]:
        """The newest intact checkpoint as ``(state, meta, step)``; ``(template, {}, None)``
        when the work dir has none.

        Tries the checkpoints newest first. One that fails (unreadable, incomplete, digest
        mismatch) is logged in one line (``checkpoint 12 unusable (...); trying 10``) and the
        next older one is tried. ``check_meta(meta)`` runs on each candidate's verified meta
        before its state is restored (e.g. to refuse a work dir of a different run); what it
        raises propagates. Unusable checkpoints newer than the restored one are moved into
        ``workdir/checkpoints_unusable/`` so that training can save those steps again.

        Raises :class:`NoUsableCheckpointError` (nothing moved or deleted) when checkpoints
        exist but none is usable.
        """
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        self.skipped = []
        for i, step in enumerate(steps):
            try:
                meta, integrity = self._read_meta(step)
                ok = True
            except CheckpointCorruptError as e:
                reason, ok = str(e), False
            if all_processes(ok):
                if check_meta is not None:
                    check_meta(meta)
                try:
                    state = self._restore_verified(step, template, integrity)
                except CheckpointCorruptError as e:
                    reason, ok = str(e), False
            elif ok:
                reason, ok = "meta unreadable on another process", False
            if ok:
                self._set_aside([s for s, _ in self.skipped])
                self._remove_unreferenced()
                return state, meta, step
            self.skipped.append((step, reason))
            nxt = f"trying {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            log.warning("checkpoint %d unusable (%s); %s", step, reason, nxt)
        if not steps:
            return template, {}, None
        newest, why = self.skipped[0]
        raise NoUsableCheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} is usable (newest, "
            f"{newest}: {why}); nothing was deleted: move them away to start afresh"
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Move the checkpoints of ``steps`` (newer than the restored one) out of orbax's way."""
        if not steps:
            return
        if jax.process_index() == 0:
            os.makedirs(self.unusable_directory, exist_ok=True)
            moved = []
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = os.path.join(self.unusable_directory, str(step))
                n = 1
                while os.path.exists(dst):
                    dst = os.path.join(self.unusable_directory, f"{step}.{n}")
                    n += 1
                shutil.move(src, dst)
                moved.append(os.path.basename(dst))
            log.warning(
                "moved the unusable checkpoints %s to %s", ", ".join(moved), self.unusable_directory
            )
        sync("contrastive.run.checkpoint.set_aside")
        self._manager.reload()

    def close(self) -> None:
        """Wait for an asynchronous write (raising :class:`CheckpointWriteError` if it failed)
        and release orbax's threads. After a failed write has been reported, its error is not
        raised again."""
        try:
            self._wait_for_write_in_flight()
            if self._write_failed:
                with contextlib.suppress(Exception), logs_held_back():
                    self._manager.wait_until_finished()
            else:
                self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
