"""Where the streamed step reads its chunks: sources, the chunk layout, checksums, checks.

A :class:`ChunkSource` yields chunk ``k`` of this host's rows of step ``s``, the same bytes
every time it is asked; :func:`batch_source` makes one from a global batch held in memory
(tests), :func:`rows_source` from a function of the data pipeline. Each chunk gets a cheap
checksum in the first pass, so a second read that differs stops the step
(:mod:`contrastive.step.streamed.step`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np
from jax.sharding import Mesh

from contrastive.mesh import DATA_AXIS
from contrastive.step.train_step import (
    as_batch,
)

# The in-memory step's own reduction rule, finiteness check and state shardings: one of each.
from contrastive.step_configs import local_chunk_size


class Chunk(NamedTuple):
    """This host's rows of one chunk, as host (numpy) arrays.

    ``x``: the first tower's inputs, a pytree of ``[rows_x, ...]`` arrays, or None for a
    chunk past the last one of ``x`` (only when ``y`` has more rows, ``M > B``); ``y``:
    the second tower's ``[rows_y, ...]``; ``ids`` ``[rows_y]`` int and ``valid``
    ``[rows_y]`` bool: the loss's duplicate ids and padding mask of those ``y`` rows
    (see :class:`contrastive.step.train_step.Batch`), or None. Rows are device-major: this
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


def local_device_positions(mesh: Mesh) -> list[int]:
    me = jax.process_index()
    return [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]


def chunk_layout(batch_sizes: tuple[int, int], mesh: Mesh, *, chunk_size: int) -> _Layout:
    """The layout of a step's chunks: which rows chunk ``k`` holds, per device and host.

    Device ``d`` holds rows ``d B/n .. (d+1) B/n - 1`` of ``x`` (as
    :func:`contrastive.mesh.shard_batch` puts them); its rows of chunk ``k`` are its local
    rows ``k c_l .. min((k+1) c_l, B/n) - 1`` with ``c_l = chunk_size / n``: the chunks of
    the in-memory step (:mod:`contrastive.step.gradcache`, inside ``shard_map``). The same for
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
    return _Layout(n, local_device_positions(mesh), cl, rows, chunks)


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

    ``batch``: a :class:`contrastive.step.train_step.Batch` (or ``(x, y[, ids[, valid]])``) of
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
    :func:`contrastive.data.pipeline.train_dataset`, whose per-example view
    (:func:`contrastive.data.pipeline.train_examples`) gives ``dataset`` and ``collate``.
    ``dataset[i]`` is example ``i`` (a grain ``MapDataset``, shuffled and augmented per
    index, is re-readable); ``collate(examples)`` stacks a list of them into ``(x, y[, ids[,
    valid]])`` (or into what the caller's ``rows`` turns into that).
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    def rows(step: int, index: np.ndarray) -> Any:
        first = (step * count + p) * host_batch_size
        return collate([dataset[first + int(i)] for i in index])

    return rows


# ------------------------------------------------------------------ reading with checks


def chunk_checksum(chunk: Chunk) -> int:
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


def read_chunks(
    read: Callable[[int], Any], count: int, prefetch: bool
) -> Iterator[tuple[int, Any]]:
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


def tree_signature(tree: Any) -> _Signature:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return _Signature(treedef, tuple((np.shape(a)[1:], np.result_type(a)) for a in leaves))


def check_part(tree, what, rows, signature, where) -> None:
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
    if signature is not None and tree_signature(tree) != signature:
        raise ValueError(
            f"{where}: {what} differs in structure, trailing shapes or dtypes from chunk 0 "
            f"({tree_signature(tree).trailing} vs {signature.trailing})."
        )
