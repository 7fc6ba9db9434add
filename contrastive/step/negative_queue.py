"""A negative queue: the last K steps' y embeddings, kept on the devices as extra negatives.

MoCo (He et al. 2020, arXiv 1911.05722) keeps a first-in-first-out queue of past keys and
uses them as negatives of the current queries; cross-batch memory (XBM, Wang et al. 2020,
arXiv 1912.06798) and ContAccum (Kim et al. 2024) do the same without MoCo's momentum
encoder, which is what this module does: the queued rows are the y-tower embeddings of
the batch's positives, computed with the parameters of the step that made them, frozen.

Layout. With ``n`` devices, ``b = B / n`` pairs per device and a queue of ``K`` steps,
every field is a global array split along the data axis like the batch, so each device
holds its own rows of the last ``K`` steps and nothing is ever communicated:

* ``embeddings`` ``[n·K·b, D]``: device ``k`` holds ``[K·b, D]``, slot ``s`` (rows
  ``s·b .. (s+1)·b - 1``) one past step's ``b`` positives of that device;
* ``ids`` ``int32[n·K·b]``: the example ids of those rows (``-1``: pushed without ids);
* ``valid`` ``bool[n·K·b]``: False until a slot has been filled (and for padded pairs);
* ``position`` ``int32[]`` (replicated): the next slot to overwrite, the oldest one.

Inside ``jax.shard_map`` (:func:`queue_specs`), :func:`with_negatives` appends the local
queue to the local ``y`` (the losses' "retrieval-shaped" batch: the first ``b`` local rows
pair with the local ``x``, further rows are extra negatives of every anchor) and
:func:`push` overwrites the oldest slot with the step's positives, *after* the loss, so a
batch never meets itself in the queue. The loss with the queue is the loss of the global
batch whose ``y`` is ``[y; all queued rows]`` (the order of negatives does not matter),
with ``M = B + K·B`` candidates per anchor.

Ids. With ids (for ``captioned_shapes`` the caption id), a queued row that shares an
anchor's id is not that anchor's negative: an earlier copy of the same example never
pushes its own positive away. Without ids a queued row is always a negative; a queue that
together with the batch spans at most one epoch (:func:`check_queue_length`) holds no
earlier copy of a batch's example when the data is read in a fixed order; with per-epoch
reshuffling, a batch just after an epoch boundary may meet copies from the end of the
previous epoch (a share of at most ``K·B / N`` of its examples): pass ids to exclude them.

Example (inside ``shard_map`` over ``"data"``, ``b`` rows per device)::

    queue = place_queue(init_queue(K, B // n, D, devices=n), mesh)   # global, sharded

    def local(x, y, queue):
        y_ext, _, valid = with_negatives(y, None, None, queue)   # (b + K·b, D), (b + K·b,)
        loss = losses.infonce(x, y_ext, valid=valid, axis_name="data")
        return loss, push(queue, y)

    jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), queue_specs()),
                  out_specs=(P(), queue_specs()))
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contrastive.mesh import DATA_AXIS, place

__all__ = [
    "NegativeQueue",
    "QUEUE_ROWS",
    "init_queue",
    "queue_specs",
    "queue_shardings",
    "place_queue",
    "push",
    "with_negatives",
    "queued_loss_fn",
    "check_queue_length",
]

# The aux entry in which :func:`queued_loss_fn` hands out the rows to push (this device's
# positives, [b, D], without gradient).
QUEUE_ROWS = "queue_rows"

# Stored as the id of rows pushed without ids.
NO_ID = -1


class NegativeQueue(NamedTuple):
    """The queue state (a pytree): global arrays, or one device's rows inside shard_map.

    Shapes are global ``[n·K·b, ...]`` (local ``[K·b, ...]``); see the module docstring.
    """

    embeddings: jax.Array  # [n·K·b, D], the queued y embeddings
    ids: jax.Array  # int32[n·K·b], their example ids (NO_ID when pushed without ids)
    valid: jax.Array  # bool[n·K·b], False for empty slots and padded pairs
    position: jax.Array  # int32[], the next slot to overwrite (the oldest), mod K


def _positive_int(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}.")
    return int(value)


def init_queue(
    steps: int,
    rows_per_device: int,
    dim: int,
    dtype: Any = jnp.float32,
    *,
    devices: int = 1,
) -> NegativeQueue:
    """An empty queue of ``steps`` (K) past batches, as global (unsharded) arrays.

    Args:
      steps: ``K``, the number of past steps kept (``--negative-queue K``), at least 1.
      rows_per_device: ``b = B / n``, the pairs each device holds per step.
      dim: ``D``, the embedding size.
      dtype: the embeddings' dtype (float32 or bfloat16, as the model's embeddings).
      devices: ``n``, the size of the data axis the queue will be split over.

    Returns:
      A :class:`NegativeQueue` with ``embeddings`` zeros ``[n·K·b, D]``, ``ids`` ``-1``,
      ``valid`` all False, ``position`` 0. Put it on the mesh with :func:`place_queue`.

    Example:
      >>> q = init_queue(4, 8, 16, devices=2)
      >>> q.embeddings.shape, q.valid.shape, int(q.position)
      ((64, 16), (64,), 0)
    """
    steps = _positive_int("init_queue", "steps (--negative-queue K)", steps)
    b = _positive_int("init_queue", "rows_per_device", rows_per_device)
    dim = _positive_int("init_queue", "dim", dim)
    n = _positive_int("init_queue", "devices", devices)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(
            f"init_queue: dtype must be a float dtype (the embeddings'), got {jnp.dtype(dtype)}."
        )
    rows = n * steps * b
    return NegativeQueue(
        embeddings=jnp.zeros((rows, dim), dtype),
        ids=jnp.full((rows,), NO_ID, jnp.int32),
        valid=jnp.zeros((rows,), bool),
        position=jnp.zeros((), jnp.int32),
    )


def queue_specs(axis_name: str | tuple[str, ...] = DATA_AXIS) -> NegativeQueue:
    """``PartitionSpec`` s of a queue for ``jax.shard_map``: rows split along ``axis_name``
    (like the batch), the position replicated."""
    rows = PartitionSpec(axis_name)
    return NegativeQueue(rows, rows, rows, PartitionSpec())


def queue_shardings(mesh: Mesh, axis_name: str = DATA_AXIS) -> NegativeQueue:
    """``NamedSharding`` s of a queue on ``mesh`` (for ``jax.jit`` in/out shardings)."""
    return NegativeQueue(*(NamedSharding(mesh, s) for s in queue_specs(axis_name)))


def place_queue(queue: NegativeQueue, mesh: Mesh, axis_name: str = DATA_AXIS) -> NegativeQueue:
    """Put a global queue (from :func:`init_queue`) on ``mesh``, rows split over the data axis.

    The row count must be a multiple of the axis size: build the queue with
    ``devices=mesh.shape[axis_name]``.
    """
    n = mesh.shape[axis_name]
    rows = jnp.shape(queue.embeddings)[0]
    if rows % n:
        raise ValueError(
            f"place_queue: a queue of {rows} rows does not split over {n} devices; build it "
            f"with init_queue(..., devices={n})."
        )
    return place(queue, queue_shardings(mesh, axis_name))


def _check_rows(fn: str, name: str, a: Any, rows: int, *, integer: bool) -> None:
    if a is None:
        return
    if jnp.shape(a) != (rows,):
        raise ValueError(f"{fn}: {name} must have shape ({rows},), got {jnp.shape(a)}.")
    dtype = jnp.result_type(a)
    ok = jnp.issubdtype(dtype, jnp.integer) if integer else dtype == jnp.bool_
    if not ok:
        want = "an integer" if integer else "a bool"
        raise ValueError(f"{fn}: {name} must be {want} array, got dtype {dtype}.")


def _check_embeddings(fn: str, y: Any, queue: NegativeQueue) -> tuple[int, int]:
    """``(rows of y, rows of the local queue)``, after checking ranks and dimensions."""
    if jnp.ndim(y) != 2:
        raise ValueError(f"{fn}: y must have shape (rows, D), got {jnp.shape(y)}.")
    if jnp.ndim(queue.embeddings) != 2:
        raise ValueError(
            f"{fn}: queue.embeddings must have shape (K·b, D), got {jnp.shape(queue.embeddings)}."
        )
    (m, d), (q, dq) = jnp.shape(y), jnp.shape(queue.embeddings)
    if d != dq:
        raise ValueError(
            f"{fn}: y has dimension {d} (shape {jnp.shape(y)}) but the queue holds dimension "
            f"{dq} (shape {jnp.shape(queue.embeddings)}); build the queue with dim={d}."
        )
    for name, a in (("queue.ids", queue.ids), ("queue.valid", queue.valid)):
        if jnp.shape(a) != (q,):
            raise ValueError(f"{fn}: {name} must have shape ({q},), got {jnp.shape(a)}.")
    if jnp.shape(queue.position) != ():
        raise ValueError(
            f"{fn}: queue.position must be a scalar, got shape {jnp.shape(queue.position)}; "
            "pass it replicated (queue_specs())."
        )
    return m, q


def push(
    queue: NegativeQueue,
    y: jax.Array,
    ids: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> NegativeQueue:
    """Overwrite the oldest slot of the local queue with this step's positives.

    Call it inside ``shard_map`` on the local shards, after the step's loss. The rows are
    stored without gradient (``stop_gradient``), cast to the queue's dtype, with one
    ``dynamic_update_slice`` per field: no copy of the queue, no communication.

    Args:
      queue: the local queue, ``embeddings`` ``[K·b, D]`` and ``position`` replicated.
      y: ``[b, D]``, this device's positives (the first ``b`` local rows of the loss's
        ``y``; pass ``y[:b]`` when the batch has extra negatives).
      ids: None or integer ``[b]``: their example ids (stored as int32; None stores -1).
      valid: None or bool ``[b]``: False for padded pairs, which are then no negatives.

    Returns:
      The queue with slot ``position`` (rows ``position·b ..``) replaced and ``position``
      advanced by one, mod ``K``.

    Example:
      >>> q = push(init_queue(2, 3, 4), jax.numpy.ones((3, 4)))
      >>> q.valid.tolist(), int(q.position)
      ([True, True, True, False, False, False], 1)
    """
    b, q = _check_embeddings("push", y, queue)
    if q % b or q == 0:
        raise ValueError(
            f"push: the local queue holds {q} rows, not a positive multiple of the {b} rows "
            f"pushed (y {jnp.shape(y)}); build it with init_queue(K, rows_per_device={b}, "
            "...) and devices = the data-axis size, and push the positives y[:b] only."
        )
    _check_rows("push", "ids", ids, b, integer=True)
    _check_rows("push", "valid", valid, b, integer=False)
    steps = q // b
    start = queue.position.astype(jnp.int32) * b
    rows = lax.stop_gradient(y).astype(queue.embeddings.dtype)
    new_ids = jnp.full((b,), NO_ID, jnp.int32) if ids is None else ids.astype(jnp.int32)
    new_valid = jnp.ones((b,), bool) if valid is None else valid
    return NegativeQueue(
        embeddings=lax.dynamic_update_slice(queue.embeddings, rows, (start, 0)),
        ids=lax.dynamic_update_slice(queue.ids, new_ids, (start,)),
        valid=lax.dynamic_update_slice(queue.valid, new_valid, (start,)),
        position=((queue.position + 1) % steps).astype(jnp.int32),
    )


def with_negatives(
    y: jax.Array,
    ids: jax.Array | None,
    valid: jax.Array | None,
    queue: NegativeQueue,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """The loss's ``y``, ``ids``, ``valid`` with the queued rows appended as extra negatives.

    Inside ``shard_map`` on the local shards: the local ``y`` ``[m, D]`` (its first ``b``
    rows pair with the local ``x``; ``m > b`` when the batch brings extra negatives of its
    own) becomes ``[m + K·b, D]``. The queued rows enter under ``stop_gradient``: they are
    constants, no gradient flows into them (nor, through them, into the parameters of the
    steps that made them). Their dtype is cast to ``y``'s.

    Args:
      y: ``[m, D]``, the local candidates, positives first.
      ids: None or integer ``[m]``. Given, the queued rows keep their ids, and a queued
        row with an anchor's id is not that anchor's negative. None: no ids at all, every
        valid queued row is a negative of every anchor.
      valid: None (all valid) or bool ``[m]``.
      queue: the local queue.

    Returns:
      ``(y_ext [m + K·b, D], ids_ext [m + K·b] or None, valid_ext bool [m + K·b])``: pass
      them to the loss as ``y``, ``ids``, ``valid`` (empty slots are invalid).

    Example:
      >>> q = push(init_queue(2, 3, 4), jax.numpy.ones((3, 4)))
      >>> y_ext, ids_ext, valid_ext = with_negatives(jax.numpy.zeros((3, 4)), None, None, q)
      >>> y_ext.shape, ids_ext, int(valid_ext.sum())
      ((9, 4), None, 6)
    """
    m, _ = _check_embeddings("with_negatives", y, queue)
    _check_rows("with_negatives", "ids", ids, m, integer=True)
    _check_rows("with_negatives", "valid", valid, m, integer=False)
    queued = lax.stop_gradient(queue.embeddings).astype(y.dtype)
    # (m, D) ; (K·b, D) -> (m + K·b, D): the positives stay first, as the losses require.
    y_ext = jnp.concatenate([y, queued])
    ids_ext = None if ids is None else jnp.concatenate([ids, queue.ids.astype(ids.dtype)])
    own = jnp.ones((m,), bool) if valid is None else valid
    valid_ext = jnp.concatenate([own, queue.valid])
    return y_ext, ids_ext, valid_ext


def queued_loss_fn(
    make_loss: Callable[[jax.Array | None, jax.Array], Callable],
    queue: NegativeQueue,
    *,
    ids: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> Callable:
    """Wrap a loss builder so that its loss sees the queue as extra negatives.

    ``make_loss(ids, valid)`` must return ``loss_fn(params, (x, y)) -> (loss, aux)`` (aux a
    dict), e.g. ``lambda i, v: train_step.make_loss_fn(graphdef, cfg, "data", i, v)``.
    The result is ``loss_fn(params, (x, y)) -> (loss, aux)`` where the loss is taken on
    ``with_negatives(y, ids, valid, queue)`` and ``aux[QUEUE_ROWS]`` holds the rows to
    :func:`push` after the step: ``y[:b]`` (``b = x.shape[0]``) without gradient. It is a
    pure function of ``(params, embeddings)``, so ``jax.value_and_grad`` and the gradient
    cache (:mod:`contrastive.step.gradcache`) take it as they take ``loss_fn``; ``QUEUE_ROWS``
    is per device: pop it from aux before reducing the metrics over devices.

    Args:
      make_loss: ``(ids, valid) -> loss_fn``; called with the extended masks.
      queue: the local queue (inside ``shard_map``) or the whole one (no mesh).
      ids: None or integer ``[m]``: the batch's ids (local rows).
      valid: None or bool ``[m]``: the batch's valid mask (local rows).
    """

    def loss_fn(params: Any, embeddings: tuple[jax.Array, jax.Array]):
        x, y = embeddings
        y_ext, ids_ext, valid_ext = with_negatives(y, ids, valid, queue)
        loss, aux = make_loss(ids_ext, valid_ext)(params, (x, y_ext))
        return loss, {**aux, QUEUE_ROWS: lax.stop_gradient(y[: x.shape[0]])}

    return loss_fn


def check_queue_length(steps: int, batch_size: int, num_examples: int) -> None:
    """Refuse a queue that, with the current batch, spans more than an epoch.

    ``K`` queued batches and the current one hold ``(K + 1)·B`` examples; beyond
    ``num_examples`` (one epoch) a batch would meet an earlier copy of its own examples
    among the negatives, pushing the positive away (unless ids exclude it). Call it when
    the run is configured, before any work.

    Example:
      >>> check_queue_length(3, 256, 1024)
      >>> check_queue_length(4, 256, 1024)
      Traceback (most recent call last):
      ...
      ValueError: --negative-queue 4 spans more than an epoch: ...
    """
    k = _positive_int("check_queue_length", "--negative-queue (steps)", steps)
    b = _positive_int("check_queue_length", "batch_size", batch_size)
    n = _positive_int("check_queue_length", "num_examples", num_examples)
    if (k + 1) * b > n:
        fit = n // b - 1
        fix = (
            f"use --negative-queue {fit} or less"
            if fit >= 1
            else "use a smaller batch or no negative queue"
        )
        raise ValueError(
            f"--negative-queue {k} spans more than an epoch: {k} queued batches of {b} plus "
            f"the current one hold {(k + 1) * b} examples, but the data has {n}; {fix}."
        )
