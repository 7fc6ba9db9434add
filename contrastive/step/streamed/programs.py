"""The jitted programs of the streamed step: embed a chunk, the loss, pull a chunk back, update.

Each is compiled once per shape (a ragged last chunk is a second shape), with explicit
shardings and donated buffers; only the update reduces across devices.
:func:`streamed_footprint` counts what they hold resident per device, for the planner.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contrastive.mesh import DATA_AXIS, batch_sharding, mark_varying, replicated, scatter_axes
from contrastive.step import gradcache
from contrastive.step.optim import make_schedule
from contrastive.step.streamed.sources import local_device_positions
from contrastive.step.train_step import (
    TrainState,
    all_finite,
    make_loss_fn,
    reduce_grads,
    state_shardings,
    tower_fns,
)

# The in-memory step's own reduction rule, finiteness check and state shardings: one of each.
from contrastive.step_configs import TrainConfig, local_chunk_size

ROWS = PartitionSpec(DATA_AXIS)
REP = PartitionSpec()


# ------------------------------------------------------------------------- programs


def _local(mesh: Mesh, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _chunk_key(keys: jax.Array | None, k: jax.Array) -> jax.Array | None:
    return None if keys is None else keys[0, k]


def _reduce_grads(params: Any, acc: Any, *, mesh: Mesh, shard_optimizer: bool) -> Any:
    """The step's one reduction of the stacked per-device accumulators ``acc`` [n, ...]:
    psum, or psum_scatter along :func:`contrastive.mesh.scatter_axes` (as the in-memory
    step), then rounded to the parameters' dtype once."""
    n = mesh.shape[DATA_AXIS]
    none = jax.tree_util.tree_map(lambda _: None, params)
    scatter = scatter_axes(params, n) if shard_optimizer else none
    specs = jax.tree_util.tree_map(
        lambda a: REP if a is None else PartitionSpec(*([None] * a), DATA_AXIS),
        scatter,
        is_leaf=lambda a: a is None,
    )

    def local(params, acc):
        grads = reduce_grads(jax.tree_util.tree_map(lambda a: a[0], acc), DATA_AXIS, scatter)
        return jax.tree_util.tree_map(lambda p, g: g.astype(p.dtype), params, grads)

    return _local(mesh, local, (REP, ROWS), specs)(params, acc)


class _Programs(NamedTuple):
    """The jitted programs of a step (one compilation per input shape each)."""

    keys: Any  # (key, step, rows_x, rows_y) -> per-device chunk keys of x and y
    embed: tuple[Any, Any]  # pass 1, per tower
    loss: Any
    pull: tuple[Any, Any]  # pass 2, per tower
    grads: Any  # (params, acc) -> reduced gradients


# Cached so that steps made again for the same model, config and mesh (a second step with
# or without donation, prefetch on or off) reuse the compiled programs.
@functools.lru_cache(maxsize=16)
def chunk_programs(graphdef, config: TrainConfig, mesh: Mesh) -> _Programs:
    n = mesh.shape[DATA_AXIS]
    cl = local_chunk_size(config.chunk_size, n)
    towers = tower_fns(graphdef)
    rows, rep = batch_sharding(mesh), replicated(mesh)

    def keys_fn(key, step, rows_x, rows_y):
        key = jax.random.fold_in(key, step)  # as train_step: one key for the whole run

        def local(key):
            key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))  # one stream per device
            # Tower t: fold_in(key, t), then one key per chunk (gradcache's own rules).
            return tuple(
                gradcache.chunk_keys(jax.random.fold_in(key, t), r, cl)[None]
                for t, r in enumerate((rows_x, rows_y))
            )

        return _local(mesh, local, REP, (ROWS, ROWS))(key)

    keys = jax.jit(
        keys_fn, static_argnums=(2, 3), in_shardings=(rep, rep), out_shardings=(rows, rows)
    )

    def embed_fn(tower):
        def local(params, buf, side_buf, inputs, side, keys, k):
            emb = tower(lax.stop_gradient(params), inputs, _chunk_key(keys, k))
            at = k * cl  # this chunk's first row in the device's buffer

            def put(b, v):
                return lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype), at, axis=0)

            return put(buf, emb), jax.tree_util.tree_map(put, side_buf, side)

        def f(params, buf, side_buf, inputs, side, keys, k):
            specs = (REP, ROWS, ROWS, ROWS, ROWS, ROWS, REP)
            buf, side_buf = _local(mesh, local, specs, (ROWS, ROWS))(
                params, buf, side_buf, inputs, side, keys, k
            )
            return buf, side_buf, k  # k: a token the host waits on

        return jax.jit(
            f,
            in_shardings=(rep, rows, rows, rows, rows, rows, rep),
            out_shardings=(rows, rows, rep),
            donate_argnums=(1, 2),
        )

    def loss_fn(params, ex, ey, side):
        def local(params, ex, ey, side):
            params = mark_varying(params)
            f = make_loss_fn(graphdef, config.loss, DATA_AXIS, side.get("ids"), side.get("valid"))
            (loss, aux), (g_params, (gx, gy)) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
                params, (ex, ey)
            )
            # Equal on every device, typed as varying: the max of equal values is exact.
            aux = jax.tree_util.tree_map(lambda a: lax.pmax(a, DATA_AXIS), aux)
            # The accumulator starts at the loss's own parameter gradient (temperature,
            # bias; exactly 0 for the towers' parameters, to which the encoders add theirs):
            # the in-memory sum, in its order, with no second parameter-sized buffer.
            acc = jax.tree_util.tree_map(
                lambda g, p: g.astype(gradcache.accumulator_dtype(p))[None], g_params, params
            )
            return loss, aux, acc, gx, gy

        return _local(mesh, local, (REP, ROWS, ROWS, ROWS), (REP, REP, ROWS, ROWS, ROWS))(
            params, ex, ey, side
        )

    loss = jax.jit(
        loss_fn,
        in_shardings=(rep, rows, rows, rows),
        out_shardings=(rep, rep, rows, rows, rows),
        donate_argnums=(1, 2),  # the embeddings are dead once their gradients exist
    )

    def pull_fn(tower):
        def local(params, acc, g_buf, inputs, keys, k):
            params = mark_varying(params)
            r = jax.tree_util.tree_leaves(inputs)[0].shape[0]
            g = lax.dynamic_slice_in_dim(g_buf, k * cl, r, axis=0)  # this chunk's dL/de
            _, vjp = jax.vjp(lambda p: tower(p, inputs, _chunk_key(keys, k)), params)
            (pulled,) = vjp(g)
            return jax.tree_util.tree_map(lambda s, v: s + v.astype(s.dtype)[None], acc, pulled)

        def f(params, acc, g_buf, inputs, keys, k):
            specs = (REP, ROWS, ROWS, ROWS, ROWS, REP)
            return _local(mesh, local, specs, ROWS)(params, acc, g_buf, inputs, keys, k), k

        return jax.jit(
            f,
            in_shardings=(rep, rows, rows, rows, rows, rep),
            out_shardings=(rows, rep),
            donate_argnums=(1,),
        )

    reduce = functools.partial(_reduce_grads, mesh=mesh, shard_optimizer=config.shard_optimizer)
    return _Programs(
        keys,
        (embed_fn(towers[0]), embed_fn(towers[1])),
        loss,
        (pull_fn(towers[0]), pull_fn(towers[1])),
        jax.jit(reduce, in_shardings=(rep, rows)),
    )


@functools.lru_cache(maxsize=16)
def update_programs(graphdef, config: TrainConfig, mesh: Mesh, tx, donate: bool):
    """``update_for(state)``: the jitted ``(state, acc) -> (state, metrics)`` for a state of
    that structure (its shardings follow the structure, as in ``make_train_step``)."""
    del graphdef  # part of the cache key only: one model's update per entry
    rows, rep = batch_sharding(mesh), replicated(mesh)

    def update(state, acc):
        g = _reduce_grads(state.params, acc, mesh=mesh, shard_optimizer=config.shard_optimizer)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = all_finite(params) & all_finite(opt_state)
        metrics = {
            "grad_norm": optax.tree.norm(g),
            "learning_rate": make_schedule(config.optim)(state.step),
            "finite": finite.astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    cache: dict[Any, Any] = {}

    def update_for(state):
        treedef = jax.tree_util.tree_structure(state)
        if treedef not in cache:
            s = state_shardings(state, mesh, shard_optimizer=config.shard_optimizer)
            cache[treedef] = jax.jit(
                update,
                in_shardings=(s, rows),
                out_shardings=(s, rep),
                donate_argnums=(0,) if donate else (),
            )
        return cache[treedef]

    return update_for


@functools.lru_cache(maxsize=64)
def _zeros_program(shape: tuple, dtype: Any, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def sharded_zeros(shape, dtype, sharding):
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


def place_rows(tree: Any, mesh: Mesh, global_rows: int) -> Any:
    """Host rows of a chunk -> global arrays split over ``"data"`` (any process count)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (global_rows, *np.shape(a)[1:])
        ),
        tree,
    )


def hosts_agree(ok: bool, mesh: Mesh) -> bool:
    """True when every process says ``ok`` (one tiny collective; for several processes,
    so that a host whose read failed and the others all stop before the next collective)."""
    n_local = len(local_device_positions(mesh))
    flags = place_rows(np.full((n_local,), 0 if ok else 1, np.int32), mesh, mesh.shape[DATA_AXIS])
    total = jax.jit(jnp.sum, out_shardings=replicated(mesh))(flags)
    return int(total) == 0


def _used_leaves(tower, params: Any, inputs: Any) -> set[int]:
    """Indices of the parameter leaves the tower's forward pass reads (from its jaxpr)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def f(leaves, inputs):
        return tower(jax.tree_util.tree_unflatten(treedef, leaves), inputs, None)

    closed = jax.make_jaxpr(f)(leaves, inputs)
    invars = closed.jaxpr.invars[: len(leaves)]
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in closed.jaxpr.outvars}
    return {i for i, v in enumerate(invars) if id(v) in read}


def towers_share_params(towers, params: Any, specs: Sequence[Any]) -> bool:
    """True when both towers read some parameter (one tower on two views, a shared trunk)."""
    used = [_used_leaves(f, params, spec) for f, spec in zip(towers, specs, strict=True)]
    return bool(used[0] & used[1])


class TowerInfo(NamedTuple):
    embeddings: tuple[Any, Any]  # ShapeDtypeStruct of each tower's embeddings of a chunk
    shared: bool  # the towers read common parameters


def signature_of_specs(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((a.shape, jnp.dtype(a.dtype)) for a in leaves)


# ----------------------------------------------------------------------- the footprint


def streamed_footprint(
    *,
    batch_size: int,
    devices: int,
    embed_dim: int,
    params_bytes: int,
    opt_state_bytes: int,
    chunk_peak_bytes: int,
    chunk_input_bytes: int = 0,
    y_batch_size: int | None = None,
    embed_itemsize: int = 4,
    accumulator_bytes: int | None = None,
    loss_temp_bytes: int | None = None,
    intra_view: bool = False,
    embedding_grads_in_place: bool = False,
    update_temp_bytes: int = 0,
) -> dict[str, int]:
    """Per-device bytes of the streamed step, by phase, and their peak (a pure function).

    Args (all per device unless said):
      batch_size, y_batch_size: global rows ``B`` and ``M`` (default ``M = B``).
      devices: ``n``; embed_dim: ``D``; embed_itemsize: bytes of an embedding entry.
      params_bytes, opt_state_bytes: the state as held on one device (with a sharded
        optimiser state, its ``1/n`` share).
      chunk_peak_bytes: the largest temporary of the per-chunk programs (``temp_size`` of
        the compiled ``embed_*``/``pull_*`` of :func:`make_streamed_step`'s ``lower``).
      chunk_input_bytes: raw inputs of one chunk on one device (``chunk_size / n`` rows).
      accumulator_bytes: the gradient accumulator (default ``params_bytes``: float32
        parameters; twice it for bfloat16 ones).
      loss_temp_bytes: the loss program's measured temporaries; None estimates the ring's
        travelling blocks (below).
      embedding_grads_in_place: the compiled loss program writes ``dL/dx``, ``dL/dy`` into
        the donated embeddings' buffers (its alias bytes cover them): the loss phase then
        holds one set of ``(b + m) D`` buffers, the gradients being summed in the loss's
        temporaries (``loss_temp_bytes``) until they are written back.
      update_temp_bytes: the update program's temporaries (the all-reduced gradient, the
        optimiser's update), measured; 0 leaves the update phase at ``state + accumulator``.

    With ``b = B/n``, ``m = M/n`` rows per device and ``e = embed_itemsize``:

    - ``embeddings = (b + m) D e`` and ``embedding_grads`` the same;
    - ``ring`` (estimate): the visiting and the incoming ``y`` block, ``2 m D e``, and in
      the backward pass the travelling float32 gradient accumulator and its incoming copy,
      ``2 m D 4``; with intra-view negatives the ``x`` block travels too (``b`` alike);
    - ``state = params + opt_state``, ``accumulator``.

    Phases: ``pass1 = state + embeddings + chunk_input + chunk_peak``; ``loss = state +
    embeddings + embedding_grads + accumulator + ring`` (without ``embedding_grads`` when
    they are written in place); ``pass2 = state + embedding_grads + accumulator +
    chunk_input + chunk_peak``; ``update = state + accumulator + update_temp``; ``peak`` is
    their maximum. At D = 768, float32, the B-dependent bytes are ``8 D 4 = 24,576`` per
    pair on one device (the estimate; ``experiments/plan.py --stream`` measures 21,528 for
    ViT-L/14 on XLA:CPU, the gradients written in place).

    >>> f = streamed_footprint(batch_size=1024, devices=1, embed_dim=768, params_bytes=0,
    ...                        opt_state_bytes=0, chunk_peak_bytes=0)
    >>> f["peak"] // 1024
    24576
    """
    for name, v in (("batch_size", batch_size), ("devices", devices), ("embed_dim", embed_dim)):
        if v < 1:
            raise ValueError(f"{name}={v}: give a positive number.")
    m_rows = batch_size if y_batch_size is None else y_batch_size
    if batch_size % devices or m_rows % devices:
        raise ValueError(
            f"batch sizes ({batch_size}, {m_rows}) do not split over {devices} devices: use "
            f"multiples of {devices}."
        )
    b, m = batch_size // devices, m_rows // devices
    d, e = embed_dim, embed_itemsize
    embeddings = (b + m) * d * e
    ring = 2 * m * d * e + 2 * m * d * 4
    if intra_view:
        ring += 2 * b * d * e + 2 * b * d * 4
    if loss_temp_bytes is not None:
        ring = loss_temp_bytes
    state = params_bytes + opt_state_bytes
    acc = params_bytes if accumulator_bytes is None else accumulator_bytes
    out = {
        "state": state,
        "accumulator": acc,
        "embeddings": embeddings,
        "embedding_grads": embeddings,
        "ring": ring,
        "chunk_input": chunk_input_bytes,
        "chunk_peak": chunk_peak_bytes,
        "update_temp": update_temp_bytes,
    }
    grads_apart = 0 if embedding_grads_in_place else embeddings  # not the donated buffers
    out["pass1"] = state + embeddings + chunk_input_bytes + chunk_peak_bytes
    out["loss"] = state + embeddings + grads_apart + acc + ring
    out["pass2"] = state + embeddings + acc + chunk_input_bytes + chunk_peak_bytes
    out["update"] = state + acc + update_temp_bytes
    out["peak"] = max(out["pass1"], out["loss"], out["pass2"], out["update"])
    return out
