"""The sharded, optionally gradient-cached train step for dual encoders.

Reads top to bottom: configs -> state -> loss -> the per-device gradient -> the step.

The whole gradient computation runs inside ``jax.shard_map`` over the ``"data"`` mesh axis.
Each device encodes only its own rows (in chunks with :mod:`contrastive.step.gradcache`, or at
once), the loss runs as a ring across the devices (``axis_name="data"``: the global loss,
exact gradients for the local embeddings), and each device pulls its embedding gradients
back through the encoder to a *partial* parameter gradient. Those partial gradients are
reduced across devices exactly once per step, after the last chunk: one all-reduce, or
one reduce-scatter when the optimiser state is sharded (``TrainConfig(shard_optimizer=
True)``; the rules are in :mod:`contrastive.mesh`). Inside, the parameters are marked as
varying over the data axis before anything is differentiated; otherwise JAX's rules for
replicated values would insert an all-reduce into the transpose of every chunk's
re-encoding pass.

Mixed precision: build the model with ``dtype=jnp.bfloat16`` (compute) and the default
``param_dtype=float32``; parameters, gradients, optimiser state, temperature, bias and the
loss accumulation stay float32. With ``param_dtype=jnp.bfloat16`` the gradients are summed
in float32 over the chunks and the devices and rounded to bfloat16 once, after the reduction.

Example::

    mesh = make_mesh()
    model = DualEncoder(MLPEncoder(64, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    cfg = TrainConfig(loss=LossConfig("infonce"), optim=OptimConfig("lamb"), chunk_size=256)
    graphdef, state = create_train_state(model, make_optimizer(cfg.optim))
    state = place_state(state, mesh, shard_optimizer=cfg.shard_optimizer)
    step = make_train_step(graphdef, cfg, mesh)
    for batch in data:  # (inputs_x, inputs_y), leaves [B, ...] as numpy
        state, metrics = step(state, shard_batch(batch, mesh), key)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from contrastive.mesh import (
    DATA_AXIS,
    batch_sharding,
    check_batch_divisible,
    optimizer_shardings,
    place,
    replicated,
    scatter_axes,
)
from contrastive.step import gradcache
from contrastive.step.negative_queue import (
    QUEUE_ROWS,
    NegativeQueue,
    push,
    queue_shardings,
    queue_specs,
    queued_loss_fn,
)
from contrastive.step.optim import make_optimizer, make_schedule
from contrastive.step.step_loss import contrastive_loss, make_loss_fn
from contrastive.step_configs import TrainConfig, local_chunk_size

__all__ = [
    "TrainState",
    "Batch",
    "as_batch",
    "tower_fns",
    "create_train_state",
    "place_state",
    "contrastive_loss",
    "make_loss_fn",
    "loss_and_grads",
    "train_step",
    "make_train_step",
    "state_shardings",
    "reduce_grads",
    "all_finite",
]


class TrainState(NamedTuple):
    """Everything that changes from step to step (a pytree; the graphdef is static)."""

    step: jax.Array
    params: Any  # nnx.State of the model's Params
    opt_state: Any
    queue: NegativeQueue | None = None  # past y embeddings as extra negatives, or None
    examples: Any = None  # per-example state of the global loss (contrastive.step.example_states)


def _strong(tree: Any) -> Any:
    # Scalars made from Python floats are weakly typed; the state coming out of a step is
    # not. One dtype signature avoids a second compilation, and the first step and a
    # resumed step then run the very same program (bitwise-equal losses). The copy also
    # keeps the model's own arrays alive when the step donates the state.
    return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=jnp.result_type(a)), tree)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its static graphdef and a fresh :class:`TrainState`."""
    graphdef, params = nnx.split(model)
    params = _strong(params)
    opt_state = _strong(tx.init(params))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def state_shardings(state: TrainState, mesh: Mesh, *, shard_optimizer: bool = False):
    """Shardings of a train state: replicated, except the optimiser state when sharded."""
    rep = replicated(mesh)
    opt = (
        optimizer_shardings(state.opt_state, mesh)
        if shard_optimizer
        else jax.tree_util.tree_map(lambda _: rep, state.opt_state)
    )
    queue = None if state.queue is None else queue_shardings(mesh)
    rows = jax.tree_util.tree_map(lambda _: batch_sharding(mesh), state.examples)  # data axis
    return TrainState(rep, jax.tree_util.tree_map(lambda _: rep, state.params), opt, queue, rows)


def place_state(state: TrainState, mesh: Mesh, *, shard_optimizer: bool = False) -> TrainState:
    """Put a train state on the mesh (see :func:`state_shardings`)."""
    return place(state, state_shardings(state, mesh, shard_optimizer=shard_optimizer))


# ------------------------------------------------------------- the per-device gradient


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
    if not isinstance(batch, tuple | list) or not 2 <= len(batch) <= 4:
        raise ValueError(
            "a batch is Batch(x, y, ids=None, valid=None) or a tuple (x, y) / (x, y, ids); "
            f"got {type(batch).__name__}"
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
        # Mark the parameters as varying first: differentiating the replicated ones would
        # all-reduce their gradient in every chunk's backward pass (JAX's rule for the
        # transpose of a replicated value), instead of once below.
        params = jax.tree_util.tree_map(lambda p: lax.pcast(p, DATA_AXIS, to="varying"), params)
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


def train_step(
    state: TrainState,
    batch: tuple[Any, Any],
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a global :class:`Batch` (or ``(inputs_x, inputs_y)``).

    ``key`` drives dropout (None turns it off); it is folded with the step number so one
    key can be passed for the whole run. Returns the new state and scalar metrics: loss,
    temperature, bias (sigmoid), grad_norm (before clipping), pos_logit, neg_logit,
    learning_rate, and ``finite`` (1.0 when every parameter and optimiser-state entry of
    the new state is finite: a run must never checkpoint a state where it is 0).
    """
    if state.examples is not None:  # the global loss: per-example state
        from contrastive.step.example_states import global_train_step

        return global_train_step(
            state, batch, key, graphdef=graphdef, config=config, tx=tx, mesh=mesh
        )
    if key is not None:
        key = jax.random.fold_in(key, state.step)
    batch = as_batch(batch)
    (loss, aux), grads, *queue = loss_and_grads(
        state.params, batch, key, graphdef=graphdef, config=config, mesh=mesh, queue=state.queue
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = all_finite(params) & all_finite(opt_state)
    metrics = {
        "loss": loss,
        **aux,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": make_schedule(config.optim)(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return TrainState(state.step + 1, params, opt_state, *queue), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    donate: bool = True,
):
    """``step(state, batch, key) -> (state, metrics)``: :func:`train_step` under ``jax.jit``.

    Args:
      graphdef: from :func:`create_train_state`.
      config: the :class:`TrainConfig`.
      mesh: from :func:`contrastive.mesh.make_mesh`; the batch is split over ``"data"``.
      tx: the optimiser used to build the state; default ``make_optimizer(config.optim)``
        (it must be the same transformation that initialised ``state.opt_state``).
      donate: donate the incoming state's buffers to the new state.

    The state must be placed with :func:`place_state` (the same ``shard_optimizer``). The
    batch must be a multiple of the device count, and with gradient caching at least
    ``chunk_size`` rows, with ``chunk_size`` a multiple of the device count; all are
    checked when the step is traced.
    """
    tx = make_optimizer(config.optim) if tx is None else tx
    local_chunk_size(config.chunk_size, mesh.shape[DATA_AXIS])
    step = functools.partial(train_step, graphdef=graphdef, config=config, tx=tx, mesh=mesh)

    def checked(state, batch, key):
        batch = as_batch(batch)
        check_batch_divisible((batch.x, batch.example_ids), mesh)
        check_batch_divisible((batch.y, batch.ids, batch.valid), mesh)
        return step(state, batch, key)

    def jitted_for(state):
        # The state's shardings follow its structure (per-leaf rules for a sharded
        # optimiser state), known only once a state (or its ShapeDtypeStructs) is seen.
        s = state_shardings(state, mesh, shard_optimizer=config.shard_optimizer)
        return jax.jit(
            checked,
            in_shardings=(s, batch_sharding(mesh), replicated(mesh)),
            out_shardings=(s, replicated(mesh)),
            donate_argnums=(0,) if donate else (),
        )

    cache: dict[Any, Any] = {}

    def step_fn(state, batch, key):
        treedef = jax.tree_util.tree_structure(state)
        if treedef not in cache:
            cache[treedef] = jitted_for(state)
        return cache[treedef](state, batch, key)

    step_fn.lower = lambda state, batch, key: jitted_for(state).lower(state, batch, key)
    return step_fn
