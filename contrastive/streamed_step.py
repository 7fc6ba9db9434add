"""The streamed gradient cache: a train step whose global batch is never held whole.

GradCache (Gao et al. 2021, arXiv 2101.06983) holds the activations of one chunk at a time;
:mod:`contrastive.train_step` still takes the whole global batch of raw inputs as one
argument. Here the raw inputs never exist whole, on the host or on a device: a re-readable
:class:`ChunkSource` hands out chunk ``k`` of this host's rows of step ``s``, twice.

With ``n`` devices, ``B`` pairs (``M >= B`` rows of ``y``), a global chunk of ``c`` rows
(``c_l = c / n`` per device) and ``K = ceil(B / n / c_l)`` chunks, one step is:

1. **Pass 1** (``K`` reads): embed chunk after chunk into device-resident buffers
   ``x`` [B/n, D] and ``y`` [M/n, D] per device (``embed_x``/``embed_y``: no activation
   outlives its chunk). Each chunk's bytes get a crc32.
2. **Loss** (one program): the ring loss over ``"data"`` on the buffers, its value and
   ``G_x = dL/dx``, ``G_y = dL/dy`` per device, and ``dL/dθ`` of the loss's own parameters
   (temperature, bias), which seeds each device's gradient accumulator ``A`` (float32 at
   least, :func:`contrastive.gradcache.accumulator_dtype`).
3. **Pass 2** (``K`` reads, each checked against its crc32): re-encode chunk ``k`` under
   ``jax.vjp`` with the same per-chunk key and add its pull-back to the accumulator,
   ``A += (∂e_k/∂θ)ᵀ G[k]``. No communication. When the towers share parameters (one
   tower on two views, SimCLR), pass 2 sweeps the chunks twice, all ``x`` rows then all
   ``y`` rows (``2 K`` reads): the in-memory step's order of summation, so that the sums
   round alike.
4. **Update** (one program): ``g = Σ_devices A`` (one all-reduce, or one reduce-scatter
   when the optimiser state is sharded: the rules of :mod:`contrastive.mesh`), rounded to
   the parameters' dtype, then the optax update.

Exactness: chunk ``k`` of device ``d`` holds the rows ``k c_l .. (k+1) c_l - 1`` of that
device's shard, and its key is derived exactly as the in-memory step derives it,
``chunk_keys(fold_in(fold_in(fold_in(key, state.step), d), t), rows_t, c_l)[k]`` for tower
``t``; the accumulation order is the in-memory one, so the loss, the gradients and the new
state equal those of ``make_train_step(graphdef, TrainConfig(chunk_size=c), mesh)`` on the
same global batch to float32 rounding (the same sums in the same order; the tests hold
them to 1e-6 relative).

Memory. Host: at most two chunks of raw inputs (the one being computed and, with
``prefetch=True``, the next one, read by one background thread). Device: one chunk of raw
inputs at a time (the loop waits for a chunk's program before placing the next), the
embedding buffers and their gradients ``[(B + M)/n, D]``, the accumulator (the size of the
parameters), the train state, and each program's temporaries, which for the per-chunk
programs depend on the chunk, not on ``B`` (:func:`streamed_footprint` counts it all).

Faults. A chunk that cannot be read, reads different bytes in pass 2, or has the wrong
shape stops the step with a one-line :class:`ChunkReadError` (or ``ValueError``) naming
the step and the chunk, and nothing is updated: the state passed in is never donated
before the last chunk has been read and checked, and stays valid.

Example::

    mesh = make_mesh()
    cfg = TrainConfig(chunk_size=256)
    graphdef, state = create_train_state(model, tx := make_optimizer(cfg.optim))
    state = place_state(state, mesh)
    step = make_streamed_step(graphdef, cfg, mesh, tx=tx)
    source = rows_source(my_rows, batch_size=65536, mesh=mesh, chunk_size=256)
    for s in range(steps):
        state, metrics = step(state, source, s, key)
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contrastive import gradcache

# The in-memory step's own reduction rule, finiteness check and state shardings: one of each.
from contrastive.configs import TrainConfig, local_chunk_size
from contrastive.mesh import DATA_AXIS, batch_sharding, replicated, scatter_axes
from contrastive.optim import make_optimizer, make_schedule
from contrastive.train_step import (
    TrainState,
    all_finite,
    as_batch,
    make_loss_fn,
    reduce_grads,
    state_shardings,
    tower_fns,
)

__all__ = [
    "Chunk",
    "ChunkSource",
    "ChunkReadError",
    "batch_source",
    "rows_source",
    "example_rows",
    "chunk_layout",
    "make_streamed_step",
    "streamed_footprint",
]

ROWS = PartitionSpec(DATA_AXIS)
REP = PartitionSpec()


class Chunk(NamedTuple):
    """This host's rows of one chunk, as host (numpy) arrays.

    ``x``: the first tower's inputs, a pytree of ``[rows_x, ...]`` arrays, or None for a
    chunk past the last one of ``x`` (only when ``y`` has more rows, ``M > B``); ``y``:
    the second tower's ``[rows_y, ...]``; ``ids`` ``[rows_y]`` int and ``valid``
    ``[rows_y]`` bool: the loss's duplicate ids and padding mask of those ``y`` rows
    (see :class:`contrastive.train_step.Batch`), or None. Rows are device-major: this
    host's devices in mesh order, each with its rows of the chunk (:func:`chunk_layout`).
    """

    x: Any
    y: Any
    ids: Any = None
    valid: Any = None


@runtime_checkable
class ChunkSource(Protocol):
    """A re-readable source of a step's chunks.

    ``batch_sizes``: the global rows ``(B, M)`` of ``x`` and ``y`` (``M >= B``; ``M = B``
    without extra negatives). ``num_chunks``: chunks per step, ``max`` over the towers of
    ``ceil((rows / n) / (chunk_size / n))``. ``read(step, chunk)``: this host's rows of
    chunk ``chunk`` of step ``step`` (:class:`Chunk`), the same bytes every time it is
    asked: the streamed step reads each chunk twice (three times when the towers share
    parameters). With prefetch, ``read`` runs on one background thread, one call at a time.
    """

    @property
    def batch_sizes(self) -> tuple[int, int]: ...

    @property
    def num_chunks(self) -> int: ...

    def read(self, step: int, chunk: int) -> Chunk: ...


class ChunkReadError(RuntimeError):
    """A chunk could not be read, or read different bytes the second time; no update."""


# ------------------------------------------------------------------------ chunk layout


class _Layout(NamedTuple):
    """The chunk layout of one step: per-device rows and chunks of each tower."""

    devices: int  # n, devices on the data axis
    local_devices: Sequence[int]  # data-axis positions of this host's devices
    chunk: int  # c_l, rows per device in a full chunk
    rows: tuple[int, int]  # (B/n, M/n), rows per device of x and y
    chunks: tuple[int, int]  # chunks of x and of y

    @property
    def num_chunks(self) -> int:
        return max(self.chunks)

    def chunk_rows(self, tower: int, k: int) -> int:
        """Rows per device of tower ``tower`` in chunk ``k`` (0 past its last chunk)."""
        return max(0, min(self.chunk, self.rows[tower] - k * self.chunk))

    def host_index(self, tower: int, k: int) -> np.ndarray:
        """Positions of chunk ``k``'s rows in this host's part of the batch of ``tower``."""
        r, start = self.chunk_rows(tower, k), k * self.chunk
        per = self.rows[tower]
        return np.concatenate(
            [j * per + start + np.arange(r) for j in range(len(self.local_devices))]
        ).astype(np.int64)

    def global_index(self, tower: int, k: int) -> np.ndarray:
        """Positions of this host's rows of chunk ``k`` in the global batch of ``tower``."""
        r, start = self.chunk_rows(tower, k), k * self.chunk
        per = self.rows[tower]
        return np.concatenate([d * per + start + np.arange(r) for d in self.local_devices]).astype(
            np.int64
        )


def _local_devices(mesh: Mesh) -> list[int]:
    me = jax.process_index()
    return [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]


def chunk_layout(batch_sizes: tuple[int, int], mesh: Mesh, *, chunk_size: int) -> _Layout:
    """The layout of a step's chunks: which rows chunk ``k`` holds, per device and host.

    Device ``d`` holds rows ``d B/n .. (d+1) B/n - 1`` of ``x`` (as
    :func:`contrastive.mesh.shard_batch` puts them); its rows of chunk ``k`` are its local
    rows ``k c_l .. min((k+1) c_l, B/n) - 1`` with ``c_l = chunk_size / n``: the chunks of
    the in-memory step (:mod:`contrastive.gradcache`, inside ``shard_map``). The same for
    ``y`` with ``M``. ValueError (one line, saying what to change) for sizes that do not
    split.
    """
    n = mesh.shape[DATA_AXIS]
    b, m = (int(v) for v in batch_sizes)
    if m < b:
        raise ValueError(f"batch_sizes=({b}, {m}): y needs at least as many rows as x (M >= B).")
    for name, v in (("B", b), ("M", m)):
        if v % n:
            raise ValueError(
                f"{name}={v} rows do not split over {n} devices: use a multiple of {n} "
                f"(e.g. {max(n, v - v % n)})."
            )
    cl = local_chunk_size(chunk_size, n)
    if cl > b // n:
        raise ValueError(
            f"chunk_size={chunk_size} is larger than the batch of {b} rows: use a chunk_size "
            f"<= {b}."
        )
    rows = (b // n, m // n)
    chunks = tuple(-(-r // cl) for r in rows)
    return _Layout(n, _local_devices(mesh), cl, rows, chunks)


# ---------------------------------------------------------------------------- sources


class _BatchSource:
    """A :class:`ChunkSource` over one in-memory global batch (every step reads it)."""

    def __init__(self, batch: Any, mesh: Mesh, chunk_size: int):
        b = as_batch(batch)
        self._batch = jax.tree_util.tree_map(np.asarray, b)
        sizes = (_rows(self._batch.x, "x"), _rows(self._batch.y, "y"))
        self._layout = chunk_layout(sizes, mesh, chunk_size=chunk_size)
        self.batch_sizes = sizes

    @property
    def num_chunks(self) -> int:
        return self._layout.num_chunks

    def read(self, step: int, chunk: int) -> Chunk:
        del step  # the same batch at every step
        lay, b = self._layout, self._batch

        def take(tree, tower):
            if lay.chunk_rows(tower, chunk) == 0 or tree is None:
                return None
            idx = lay.global_index(tower, chunk)
            return jax.tree_util.tree_map(lambda a: a[idx], tree)

        return Chunk(take(b.x, 0), take(b.y, 1), take(b.ids, 1), take(b.valid, 1))


def _rows(tree: Any, what: str) -> int:
    sizes = {np.shape(a)[0] for a in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"every {what} array needs the same leading axis, got sizes {sizes}.")
    return sizes.pop()


def batch_source(batch: Any, mesh: Mesh, *, chunk_size: int) -> ChunkSource:
    """A :class:`ChunkSource` that cuts one in-memory global batch (for tests and tools).

    ``batch``: a :class:`contrastive.train_step.Batch` (or ``(x, y[, ids[, valid]])``) of
    host arrays, ``x`` [B, ...], ``y`` [M, ...]: the batch the in-memory step would take
    (with several processes, every process passes the whole global batch). Every step
    reads this batch. ``chunk_size``: the global chunk, as ``TrainConfig.chunk_size``.
    """
    return _BatchSource(batch, mesh, chunk_size)


class _RowsSource:
    def __init__(self, rows, batch_size: int, mesh: Mesh, chunk_size: int):
        self._rows = rows
        self._layout = chunk_layout((batch_size, batch_size), mesh, chunk_size=chunk_size)
        self.batch_sizes = (batch_size, batch_size)

    @property
    def num_chunks(self) -> int:
        return self._layout.num_chunks

    def read(self, step: int, chunk: int) -> Chunk:
        idx = self._layout.host_index(0, chunk)
        b = as_batch(tuple(self._rows(step, idx)))
        return Chunk(b.x, b.y, b.ids, b.valid)


def rows_source(
    rows: Callable[[int, np.ndarray], Any], *, batch_size: int, mesh: Mesh, chunk_size: int
) -> ChunkSource:
    """A :class:`ChunkSource` over a data pipeline's random-access rows (pairs, ``M = B``).

    ``rows(step, index)`` returns the rows ``index`` (int64 ``[r]``, positions in this
    host's ``B / processes`` rows of step ``step``, device-major) as ``(x, y)``, ``(x, y,
    ids)`` or ``(x, y, ids, valid)`` of host arrays with ``r`` rows each; it must return the
    same bytes whenever it is asked for the same rows. See :func:`example_rows` for a
    grain ``MapDataset`` (or any sequence) of examples.

    >>> src = rows_source(lambda s, i: (xs[s][i], ys[s][i]), batch_size=64, mesh=mesh,
    ...                   chunk_size=16)  # doctest: +SKIP
    """
    return _RowsSource(rows, batch_size, mesh, chunk_size)


def example_rows(
    dataset: Any,
    *,
    collate: Callable[[list[Any]], Any],
    host_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Callable[[int, np.ndarray], Any]:
    """``rows(step, index)`` for :func:`rows_source` from a random-access dataset of examples.

    Host ``p`` of ``P`` owns the examples ``(s P + p) b .. (s P + p + 1) b - 1`` of step
    ``s`` (``b = host_batch_size``): the order of
    :func:`contrastive.data.pipeline.train_dataset` before its ``batch``. ``dataset[i]`` is
    example ``i`` (a grain ``MapDataset``, shuffled and augmented per index, is re-readable);
    ``collate(examples)`` stacks a list of them into ``(x, y[, ids[, valid]])``.
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    def rows(step: int, index: np.ndarray) -> Any:
        first = (step * count + p) * host_batch_size
        return collate([dataset[first + int(i)] for i in index])

    return rows


# ------------------------------------------------------------------ reading with checks


def _checksum(chunk: Chunk) -> int:
    """crc32 of every array's dtype, shape and bytes, in tree order (None counts too)."""
    crc = 0
    for part in chunk:
        leaves, treedef = jax.tree_util.tree_flatten(part)
        crc = zlib.crc32(repr(treedef).encode(), crc)
        for a in leaves:
            a = np.ascontiguousarray(a)
            crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), crc)
            crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
    return crc


def _chunks(read: Callable[[int], Any], count: int, prefetch: bool) -> Iterator[tuple[int, Any]]:
    """``(k, read(k))`` for k < count; with ``prefetch`` one thread reads ``k + 1`` while
    the caller works on ``k``: at most two chunks are alive. Errors surface in order."""
    if not prefetch:
        for k in range(count):
            yield k, read(k)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-prefetch") as pool:
        pending = pool.submit(read, 0)
        for k in range(count):
            item = pending.result()
            pending = pool.submit(read, k + 1) if k + 1 < count else None
            yield k, item
            del item


class _Signature(NamedTuple):
    treedef: Any
    trailing: tuple  # (shape[1:], dtype) per leaf


def _signature(tree: Any) -> _Signature:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return _Signature(treedef, tuple((np.shape(a)[1:], np.result_type(a)) for a in leaves))


def _check_part(tree, what, rows, signature, where) -> None:
    """ValueError unless ``tree`` has ``rows`` rows per leaf (None for 0) and the layout of
    the step's first chunk."""
    if rows == 0:
        if tree is not None:
            raise ValueError(f"{where}: {what} must be None: the chunk has no {what} rows.")
        return
    if tree is None or not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"{where}: {what} is missing; the chunk has {rows} rows of it.")
    got = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree_util.tree_leaves(tree)}
    if got != {rows}:
        raise ValueError(
            f"{where}: {what} has leading sizes {sorted(got, key=str)}, expected {rows} rows "
            "(this host's rows of the chunk; see chunk_layout)."
        )
    if signature is not None and _signature(tree) != signature:
        raise ValueError(
            f"{where}: {what} differs in structure, trailing shapes or dtypes from chunk 0 "
            f"({_signature(tree).trailing} vs {signature.trailing})."
        )


# ------------------------------------------------------------------------- programs


def _local(mesh: Mesh, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _varying(params: Any) -> Any:
    # As in the in-memory step: differentiating replicated parameters inside shard_map
    # would all-reduce their gradient in every chunk's transpose, not once per step.
    return jax.tree_util.tree_map(lambda p: lax.pcast(p, DATA_AXIS, to="varying"), params)


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
def _chunk_programs(graphdef, config: TrainConfig, mesh: Mesh) -> _Programs:
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
            params = _varying(params)
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
            params = _varying(params)
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
def _update_programs(graphdef, config: TrainConfig, mesh: Mesh, tx, donate: bool):
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


def _zeros(shape, dtype, sharding):
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


def _place(tree: Any, mesh: Mesh, global_rows: int) -> Any:
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


def _hosts_agree(ok: bool, mesh: Mesh) -> bool:
    """True when every process says ``ok`` (one tiny collective; for several processes,
    so that a host whose read failed and the others all stop before the next collective)."""
    n_local = len(_local_devices(mesh))
    flags = _place(np.full((n_local,), 0 if ok else 1, np.int32), mesh, mesh.shape[DATA_AXIS])
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


def _towers_share_params(towers, params: Any, specs: Sequence[Any]) -> bool:
    """True when both towers read some parameter (one tower on two views, a shared trunk)."""
    used = [_used_leaves(f, params, spec) for f, spec in zip(towers, specs, strict=True)]
    return bool(used[0] & used[1])


class _TowerInfo(NamedTuple):
    embeddings: tuple[Any, Any]  # ShapeDtypeStruct of each tower's embeddings of a chunk
    shared: bool  # the towers read common parameters


def _signature_of_specs(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((a.shape, jnp.dtype(a.dtype)) for a in leaves)


# ------------------------------------------------------------------------------ the step


def make_streamed_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    prefetch: bool = True,
    donate: bool = True,
):
    """``step(state, source, step_index, key) -> (state, metrics)``: the streamed train step.

    Args:
      graphdef: from :func:`contrastive.train_step.create_train_state`.
      config: the :class:`TrainConfig`; ``chunk_size`` (the global chunk, a multiple of the
        device count) is required; ``loss`` and ``shard_optimizer`` as in the in-memory step.
      mesh: from :func:`contrastive.mesh.make_mesh`.
      tx: the optimiser that built ``state.opt_state``; default ``make_optimizer(config.optim)``.
      prefetch: read chunk ``k + 1`` on one background thread while chunk ``k`` computes.
      donate: donate the incoming state to the new one, in the last program only (after
        every chunk has been read and checked).

    ``step(state, source, step_index, key)``: ``state`` placed with
    :func:`contrastive.train_step.place_state` (same ``shard_optimizer``); ``source`` a
    :class:`ChunkSource`; ``step_index`` the step whose chunks ``source.read`` returns;
    ``key`` the run's dropout key or None (folded with ``state.step``, as in the in-memory
    step). Metrics: those of :func:`contrastive.train_step.train_step`. Raises
    :class:`ChunkReadError` (a chunk unreadable or changed in the second pass) or
    ``ValueError`` (a chunk of the wrong shape), the state untouched.

    Attributes of ``step``: ``loss_and_grads(state, source, step_index, key) -> ((loss,
    aux), grads)`` (the gradients the update would use; nothing updated) and
    ``lower(state, *, batch_sizes, x, y, ids=None, valid=None, key=None)`` -> dict of
    ``jax.stages.Lowered`` per program (``keys``, ``embed_x``, ``embed_y``, ``loss``,
    ``pull_x``, ``pull_y``, ``update``) for a full chunk of global input specs ``x``
    [chunk_size, ...], ``y``: compile-only memory planning.
    """
    if config.chunk_size is None:
        raise ValueError(
            "the streamed step needs TrainConfig(chunk_size=...): the global rows per chunk, "
            f"a multiple of the {mesh.shape[DATA_AXIS]} devices."
        )
    local_chunk_size(config.chunk_size, mesh.shape[DATA_AXIS])
    tx = make_optimizer(config.optim) if tx is None else tx
    prog = _chunk_programs(graphdef, config, mesh)
    update_for = _update_programs(graphdef, config, mesh, tx, donate)
    towers = tower_fns(graphdef)
    rows_sharding = batch_sharding(mesh)
    multi = jax.process_count() > 1
    infos: dict[Any, _TowerInfo] = {}

    def tower_info(params: Any, specs: tuple[Any, Any]) -> _TowerInfo:
        # Traced once per input layout, not once per step.
        sig = (jax.tree_util.tree_structure(params), tuple(map(_signature_of_specs, specs)))
        if sig not in infos:
            embeddings = tuple(
                jax.eval_shape(f, params, spec, None) for f, spec in zip(towers, specs, strict=True)
            )
            infos[sig] = _TowerInfo(embeddings, _towers_share_params(towers, params, specs))
        return infos[sig]

    def run(state, source, step_index, key):
        """Passes 1 and 2: ``(loss, aux, acc)``; the state is only read."""
        if not isinstance(source, ChunkSource):
            raise ValueError(
                f"source must be a ChunkSource (batch_sizes, num_chunks, read), got "
                f"{type(source).__name__}"
            )
        lay = chunk_layout(tuple(source.batch_sizes), mesh, chunk_size=config.chunk_size)
        if source.num_chunks != lay.num_chunks:
            raise ValueError(
                f"source.num_chunks={source.num_chunks} but batch_sizes={source.batch_sizes} "
                f"in chunks of {config.chunk_size} make {lay.num_chunks}: build the source "
                "with the step's chunk_size."
            )
        n, n_local = lay.devices, len(lay.local_devices)
        params = state.params
        keys = (None, None) if key is None else prog.keys(key, state.step, *lay.rows)
        sums: list[int] = []
        signatures: list[Any] = [None] * 4

        def read(pass_no: int, k: int):
            where = f"step {step_index}, chunk {k}"
            try:
                chunk = source.read(step_index, k)
            except Exception as e:
                what = "could not be read" + (" in the second pass" if pass_no == 2 else "")
                hint = ": the data source is not re-readable" if pass_no == 2 else ""
                cause = " ".join(str(e).split())  # one line, whatever the source raised
                raise ChunkReadError(
                    f"{where}: the chunk {what} ({type(e).__name__}: {cause}){hint}; no "
                    "update was applied"
                ) from e
            if not isinstance(chunk, Chunk):
                chunk = Chunk(*chunk)
            return chunk, _checksum(chunk)

        def check(chunk: Chunk, k: int) -> None:
            where = f"step {step_index}, chunk {k}"
            rx, ry = lay.chunk_rows(0, k) * n_local, lay.chunk_rows(1, k) * n_local
            for i, (part, r) in enumerate(zip(chunk, (rx, ry, ry, ry), strict=True)):
                optional = i >= 2
                if optional and k > 0 and (part is None) != (signatures[i] is None):
                    raise ValueError(
                        f"{where}: {Chunk._fields[i]} is given in some chunks and not others."
                    )
                if optional and part is None:
                    continue
                _check_part(part, Chunk._fields[i], r, signatures[i], where)
                if k == 0:
                    signatures[i] = _signature(part)

        def guarded(pass_no: int, body: Callable[[], None]) -> None:
            # With several processes a failure on one host must not leave the others
            # waiting in the next collective: everyone agrees first, then raises.
            if not multi:
                body()
                return
            try:
                body()
            except Exception:
                _hosts_agree(False, mesh)
                raise
            if not _hosts_agree(True, mesh):
                raise ChunkReadError(
                    f"step {step_index}: another process failed in pass {pass_no}; no update "
                    "was applied"
                )

        bufs: dict[str, Any] = {}

        def pass_one() -> None:
            token = None
            gen = _chunks(lambda k: read(1, k), lay.num_chunks, prefetch)
            with contextlib.closing(gen):
                for k, (chunk, crc) in gen:
                    check(chunk, k)
                    sums.append(crc)
                    if k == 0:
                        _allocate(chunk)
                    for t in (0, 1):
                        r = lay.chunk_rows(t, k)
                        if r == 0:
                            continue
                        inputs = _place(chunk[t], mesh, r * n)
                        side = {}
                        if t == 1:
                            side = {
                                name: _place(v, mesh, r * n)
                                for name, v in (("ids", chunk.ids), ("valid", chunk.valid))
                                if v is not None
                            }
                        emb, side_buf, token = prog.embed[t](
                            params,
                            bufs[f"emb{t}"],
                            bufs["side"] if t == 1 else {},
                            inputs,
                            side,
                            keys[t],
                            np.int32(k),
                        )
                        bufs[f"emb{t}"] = emb
                        if t == 1:
                            bufs["side"] = side_buf
                        del inputs, side
                    del chunk
                    # One chunk on the devices at a time: wait for this chunk's programs
                    # before the next chunk is placed (async dispatch would run ahead).
                    token.block_until_ready()

        def _allocate(chunk: Chunk) -> None:
            specs = tuple(
                jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a)), part
                )
                for part in chunk[:2]
            )
            bufs["info"] = info = tower_info(params, specs)
            for t, out in enumerate(info.embeddings):
                bufs[f"emb{t}"] = _zeros(
                    (lay.rows[t] * n, *out.shape[1:]), out.dtype, rows_sharding
                )
            bufs["side"] = {
                name: _zeros(
                    (lay.rows[1] * n,),
                    jax.dtypes.canonicalize_dtype(np.result_type(v)),
                    rows_sharding,
                )
                for name, v in (("ids", chunk.ids), ("valid", chunk.valid))
                if v is not None
            }

        guarded(1, pass_one)
        loss, aux, acc, gx, gy = prog.loss(
            params, bufs.pop("emb0"), bufs.pop("emb1"), bufs.pop("side")
        )
        g_emb = [gx, gy]
        del gx, gy
        out = {"acc": acc}
        del acc

        # The order of the sum over chunks is the in-memory step's: chunk by chunk when the
        # towers' parameters are disjoint (each sum then sees its own chunks in order, the
        # other tower adding exact zeros); tower by tower (all x chunks, then all y chunks,
        # reading each chunk once per sweep) when they share parameters (SimCLR's one
        # tower), where interleaving would round differently.
        sweeps = ((0,), (1,)) if bufs.pop("info").shared else ((0, 1),)

        def pass_two() -> None:
            for sweep in sweeps:
                token = None
                count = max(lay.chunks[t] for t in sweep)
                gen = _chunks(lambda k: read(2, k), count, prefetch)
                with contextlib.closing(gen):
                    for k, (chunk, crc) in gen:
                        if crc != sums[k]:
                            raise ChunkReadError(
                                f"step {step_index}, chunk {k}: the chunk read in the second "
                                f"pass differs from the first (checksum {crc:#010x} != "
                                f"{sums[k]:#010x}): the data source is not re-readable; no "
                                "update was applied"
                            )
                        for t in sweep:
                            r = lay.chunk_rows(t, k)
                            if r == 0:
                                continue
                            inputs = _place(chunk[t], mesh, r * n)
                            out["acc"], token = prog.pull[t](
                                params, out["acc"], g_emb[t], inputs, keys[t], np.int32(k)
                            )
                            del inputs
                            if k == lay.chunks[t] - 1:
                                g_emb[t] = None  # the tower's last chunk: free its dL/de
                        del chunk
                        token.block_until_ready()

        guarded(2, pass_two)
        return loss, aux, out["acc"]

    def step(
        state: TrainState, source: ChunkSource, step_index: int, key: jax.Array | None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, aux, acc = run(state, source, step_index, key)
        state, metrics = update_for(state)(state, acc)
        return state, {"loss": loss, **aux, **metrics}

    def loss_and_grads(
        state: TrainState, source: ChunkSource, step_index: int, key: jax.Array | None
    ) -> tuple[tuple[jax.Array, dict], Any]:
        loss, aux, acc = run(state, source, step_index, key)
        return (loss, aux), prog.grads(state.params, acc)

    def lower(
        state: TrainState,
        *,
        batch_sizes: tuple[int, int],
        x: Any,
        y: Any,
        ids: Any = None,
        valid: Any = None,
        key: Any = None,
    ) -> dict[str, jax.stages.Lowered]:
        lay = chunk_layout(tuple(batch_sizes), mesh, chunk_size=config.chunk_size)
        n = lay.devices

        def spec(shape, dtype, sharding=rows_sharding):
            return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

        params = state.params
        k = spec((), jnp.int32, replicated(mesh))
        keys = (None, None)
        if key is not None:
            keys = jax.eval_shape(lambda kk, s: prog.keys(kk, s, *lay.rows), key, state.step)
        side_chunk = {name: v for name, v in (("ids", ids), ("valid", valid)) if v is not None}
        side_buf = {name: spec((lay.rows[1] * n,), v.dtype) for name, v in side_chunk.items()}
        out: dict[str, Any] = {}
        if key is not None:
            out["keys"] = prog.keys.lower(key, state.step, *lay.rows)
        embs = []
        for t, inputs in enumerate((x, y)):
            e = jax.eval_shape(towers[t], params, inputs, None)
            buf = spec((lay.rows[t] * n, *e.shape[1:]), e.dtype)
            embs.append(buf)
            name = "xy"[t]
            out[f"embed_{name}"] = prog.embed[t].lower(
                params,
                buf,
                side_buf if t == 1 else {},
                inputs,
                side_chunk if t == 1 else {},
                keys[t],
                k,
            )
        out["loss"] = prog.loss.lower(params, embs[0], embs[1], side_buf)
        acc = jax.tree_util.tree_map(
            lambda p: spec((n, *p.shape), gradcache.accumulator_dtype(p)), params
        )
        for t, inputs in enumerate((x, y)):
            out[f"pull_{'xy'[t]}"] = prog.pull[t].lower(params, acc, embs[t], inputs, keys[t], k)
        out["update"] = update_for(state).lower(state, acc)
        return out

    step.loss_and_grads = loss_and_grads
    step.lower = lower
    return step


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

    With ``b = B/n``, ``m = M/n`` rows per device and ``e = embed_itemsize``:

    - ``embeddings = (b + m) D e`` and ``embedding_grads`` the same;
    - ``ring`` (estimate): the visiting and the incoming ``y`` block, ``2 m D e``, and in
      the backward pass the travelling float32 gradient accumulator and its incoming copy,
      ``2 m D 4``; with intra-view negatives the ``x`` block travels too (``b`` alike);
    - ``state = params + opt_state``, ``accumulator``.

    Phases: ``pass1 = state + embeddings + chunk_input + chunk_peak``; ``loss = state +
    embeddings + embedding_grads + accumulator + ring``; ``pass2 = state + embedding_grads
    + accumulator + chunk_input + chunk_peak``; ``peak`` is their maximum. At D = 768,
    float32, the B-dependent bytes are ``8 D 4 = 24,576`` per pair on one device.

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
    }
    out["pass1"] = state + embeddings + chunk_input_bytes + chunk_peak_bytes
    out["loss"] = state + 2 * embeddings + acc + ring
    out["pass2"] = state + embeddings + acc + chunk_input_bytes + chunk_peak_bytes
    out["peak"] = max(out["pass1"], out["loss"], out["pass2"])
    return out
