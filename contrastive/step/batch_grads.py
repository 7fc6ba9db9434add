"""The loss and the parameter gradients of a batch, on each device, and their one reduction.

The core the train steps share (:mod:`contrastive.step.train_step`, and the global loss's
step in :mod:`contrastive.step.example_states`): a :class:`Batch`, the towers as pure
functions of the parameters, each device's loss and *partial* parameter gradient of its own
rows inside ``jax.shard_map`` (in chunks with :mod:`contrastive.step.gradcache`, or at once;
the loss on the ring), and the reduction of those partial gradients across devices, exactly
once per step (an all-reduce, or a reduce-scatter when the optimiser state is sharded).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from contrastive.mesh import (
    DATA_AXIS,
    mark_varying,
    scatter_axes,
)
from contrastive.step import gradcache
from contrastive.step.negative_queue import (
    QUEUE_ROWS,
    NegativeQueue,
    push,
    queue_specs,
    queued_loss_fn,
)
from contrastive.step.step_loss import make_loss_fn
from contrastive.step_configs import TrainConfig, local_chunk_size

__all__ = ["Batch", "as_batch", "tower_fns", "local_loss_and_grads", "reduce_grads",
           "loss_and_grads", "all_finite"]  # fmt: skip


class Batch(NamedTuple):
    """A global batch: ``x`` the first tower's inputs [B, ...], ``y`` the second's [M, ...]
    with ``M >= B`` (``y[:B]`` pair with ``x``; more rows are extra negatives), and for the
    loss ``ids`` [M] (int; equal ids are not negatives of each other) and ``valid`` [M]
    (bool; False drops a pair or a negative). Sharded over devices, each device holds B/n
    rows of ``x`` and M/n of ``y``, its own positives first (see ``losses.sharded``).
    ``example_ids`` [B] (int): each pair's index in the training set, for a loss with
    per-example state (``contrastive.step.example_states``).

    A plain tuple ``(x, y)`` or ``(x, y, ids)`` is accepted wherever a Batch is.
    """

    x: Any
    y: Any
    ids: jax.Array | None = None
    valid: jax.Array | None = None
    example_ids: jax.Array | None = None


def as_batch(batch: Any) -> Batch:
    if isinstance(batch, Batch):
        return batch
    if not isinstance(batch, tuple | list) or not 2 <= len(batch) <= len(Batch._fields):
        raise ValueError(
            "a batch is Batch(x, y, ids=None, valid=None, example_ids=None) or a tuple (x, y) "
            f"/ (x, y, ids) / ... in that order; got {type(batch).__name__}"
            + (f" of {len(batch)}" if isinstance(batch, tuple | list) else "")
        )
    return Batch(*batch)


def tower_fns(graphdef: nnx.GraphDef):
    """``(embed_x, embed_y)``: ``f(params, inputs, key) -> [rows, D]`` for each tower."""

    def tower(method: str):
        def f(params: Any, inputs: Any, key: jax.Array | None = None):
            return getattr(nnx.merge(graphdef, params), method)(inputs, key)

        return f

    return tower("embed_x"), tower("embed_y")


def local_loss_and_grads(
    params: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    axis_name: str | None,
    keep_accumulator_dtype: bool = False,
    queue: NegativeQueue | None = None,
    loss_fn: Any = None,
    towers: Any = None,
) -> tuple[tuple[jax.Array, dict], Any]:
    """``((loss, aux), partial grads)`` of this device's rows, before any reduction.

    Inside ``shard_map`` (``axis_name`` set) ``batch`` holds the local rows and ``params``
    must already vary over the axis (see :func:`train_step`): the loss and ``aux`` are
    global, the gradients this device's share of the global gradient (their sum over
    devices is the gradient). With ``axis_name=None`` it is the whole computation.

    ``keep_accumulator_dtype``: gradients in :func:`contrastive.step.gradcache.accumulator_dtype`
    (float32 for bfloat16 parameters), not rounded to the parameters' dtype, for a caller
    that sums them across devices before rounding once (:func:`loss_and_grads`).

    ``queue``: this device's negative queue; its rows are extra negatives of the loss, and
    ``aux[QUEUE_ROWS]`` returns this device's y positives to push (see
    :func:`contrastive.step.negative_queue.queued_loss_fn`).

    ``loss_fn``, ``towers``: given, they replace the configured loss and the model's towers
    (``params`` is then whatever they take; the global loss's ``(params, τ rows)``).
    """
    batch = as_batch(batch)
    towers = tower_fns(graphdef) if towers is None else towers
    if loss_fn is not None:
        pass
    elif queue is None:
        loss_fn = make_loss_fn(graphdef, config.loss, axis_name, batch.ids, batch.valid)
    else:
        make = functools.partial(make_loss_fn, graphdef, config.loss, axis_name)
        loss_fn = queued_loss_fn(make, queue, ids=batch.ids, valid=batch.valid)
    devices = 1 if axis_name is None else lax.psum(1, axis_name)
    chunk = local_chunk_size(config.chunk_size, devices)
    inputs = (batch.x, batch.y)
    if chunk is None:
        keys = [None if key is None else jax.random.fold_in(key, t) for t in range(2)]

        def whole(p):
            emb = tuple(f(p, a, k) for f, a, k in zip(towers, inputs, keys, strict=True))
            return loss_fn(p, emb)

        out, grads = jax.value_and_grad(whole, has_aux=True)(params)
        if keep_accumulator_dtype:
            grads = jax.tree_util.tree_map(
                lambda g: g.astype(gradcache.accumulator_dtype(g)), grads
            )
        return out, grads
    f = gradcache.towers_value_and_grad(
        towers,
        loss_fn,
        chunk_size=chunk,
        has_aux=True,
        keep_accumulator_dtype=keep_accumulator_dtype,
    )
    return f(params, inputs, key)


def reduce_grads(grads: Any, axis_name: str, scatter: Any) -> Any:
    """Sum partial gradients over the devices: psum, or psum_scatter on the sharded axis."""

    def one(g, axis):
        if axis is None:
            return lax.psum(g, axis_name)
        return lax.psum_scatter(g, axis_name, scatter_dimension=axis, tiled=True)

    return jax.tree_util.tree_map(one, grads, scatter)


def loss_and_grads(
    params: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    queue: NegativeQueue | None = None,
) -> tuple[tuple[jax.Array, dict], Any] | tuple[tuple[jax.Array, dict], Any, NegativeQueue]:
    """``((loss, aux), grads)`` of the global batch (sharded over ``"data"``) on ``mesh``;
    with a negative ``queue``, ``((loss, aux), grads, queue)``: the loss has the queued rows
    as extra negatives, and the returned queue has this batch's y positives pushed.

    One ``shard_map`` holds the whole computation; the gradients are reduced across
    devices once, in float32 at least, and then rounded to the parameters' dtype. With
    ``config.shard_optimizer`` they come out reduce-scattered (sharded as
    :func:`contrastive.mesh.optimizer_shardings` says), otherwise replicated.
    """
    scatter = (
        scatter_axes(params, mesh.shape[DATA_AXIS])
        if config.shard_optimizer
        else jax.tree_util.tree_map(lambda _: None, params)
    )
    grad_specs = jax.tree_util.tree_map(
        lambda a: PartitionSpec() if a is None else PartitionSpec(*([None] * a), DATA_AXIS),
        scatter,
        is_leaf=lambda a: a is None,
    )
    rows = PartitionSpec(DATA_AXIS)
    batch = as_batch(batch)

    def local(params, batch, key, queue=None):
        params = mark_varying(params)  # the gradient is reduced once, below
        if key is not None:  # one dropout stream per device
            key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
        (loss, aux), grads = local_loss_and_grads(
            params,
            batch,
            key,
            graphdef=graphdef,
            config=config,
            axis_name=DATA_AXIS,
            keep_accumulator_dtype=True,
            queue=queue,
        )
        if queue is not None:  # after the loss: a batch never meets itself in the queue
            aux = dict(aux)
            rows = aux.pop(QUEUE_ROWS)
            b = rows.shape[0]
            cut = lambda a: None if a is None else a[:b]
            queue = push(queue, rows, cut(batch.ids), cut(batch.valid))
        # The metrics are equal on every device but typed as varying (they come from the
        # varying parameters); the max of equal values is exact and costs a few scalars.
        aux = jax.tree_util.tree_map(lambda a: lax.pmax(a, DATA_AXIS), aux)
        # A bfloat16 gradient is rounded once, after the float32 sums over chunks and
        # devices: rounding before the reduction would add an error per device.
        grads = reduce_grads(grads, DATA_AXIS, scatter)
        grads = jax.tree_util.tree_map(lambda p, g: g.astype(p.dtype), params, grads)
        return ((loss, aux), grads) if queue is None else ((loss, aux), grads, queue)

    args, in_specs = (params, batch, key), (PartitionSpec(), rows, PartitionSpec())
    out_specs = ((PartitionSpec(), PartitionSpec()), grad_specs)
    if queue is not None:
        args, in_specs, out_specs = (
            (*args, queue),
            (*in_specs, queue_specs()),
            (*out_specs, queue_specs()),
        )
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


# ------------------------------------------------------------------------------ the step


def all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
