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
  (:func:`contrastive.state_digest.state_digest`).

Three guarantees:

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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from contrastive.orbax_logs import one_line, quiet
from contrastive.state_digest import digests_and_nonfinite, is_key, keys_to_data, meta_digest

__all__ = [
    "CheckpointCorruptError",
    "Checkpointer",
    "NoUsableCheckpointError",
    "NonFiniteStateError",
]

log = logging.getLogger(__name__)

UNUSABLE_DIR = "checkpoints_unusable"


class NonFiniteStateError(ValueError):
    """A save was refused because the state holds NaN or Inf (one-line message)."""


class CheckpointCorruptError(RuntimeError):
    """One checkpoint cannot be used: unreadable, incomplete or its digest differs."""


class NoUsableCheckpointError(RuntimeError):
    """The work dir holds checkpoints but none of them can be restored (one-line message)."""


# --- PRNG keys -----------------------------------------------------------------------------


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings where known) describing the stored form of ``tree``."""

    def one(x: Any) -> Any:
        if is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)

    return jax.tree_util.tree_map(one, tree)


def _rewrap_keys(restored: Any, template: Any) -> Any:
    def one(r: Any, t: Any) -> Any:
        if is_key(t):
            key = jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
            sharding = getattr(t, "sharding", None)
            return jax.device_put(key, sharding) if sharding is not None else key
        return r

    return jax.tree_util.tree_map(one, restored, template)


# --- multi-process agreement ---------------------------------------------------------------


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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

    Raises (all with one-line messages): :class:`NonFiniteStateError` from :meth:`save`,
    :class:`CheckpointCorruptError` from :meth:`read_meta` / :meth:`restore`,
    :class:`NoUsableCheckpointError` from :meth:`restore_latest`.
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
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta", "integrity"), options=options
        )
        #: ``[(step, reason)]`` of the checkpoints the last :meth:`restore_latest` skipped.
        self.skipped: list[tuple[int, str]] = []

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
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(keys_to_data(state)),
                meta=ocp.args.JsonSave(meta),
                integrity=ocp.args.JsonSave(integrity),
            ),
            force=force,
        )
        return bool(saved)

    def maybe_save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Save when ``step`` is a multiple of ``every``."""
        if not self.should_save(step):
            return False
        return self.save(step, state, meta)

    def _read_meta(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if step not in self._manager.all_steps():
            raise CheckpointCorruptError(f"checkpoint {step} does not exist in {self.directory}")
        try:
            with quiet():
                out = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()
                    ),
                )
            meta, integrity = out.meta, out.integrity
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
                out = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template))),
                )
            stored = out.state
            if stored is None:
                reason = "state item missing"
        except Exception as e:
            reason = f"state unreadable: {one_line(e)}"
        # Every process must take the same branch before the (collective) digest.
        if not _all_processes(not reason):
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
        return _rewrap_keys(stored, template)

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
            if _all_processes(ok):
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
        _sync("contrastive.checkpoint.set_aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
