"""Spherical k-means on the device, chunked, and a balanced partition for hard-batch sampling.

NGAME (Dahiya et al. 2023, "NGAME: Negative Mining-aware Mini-batching for Extreme
Classification") and TAS-Balanced (Hofstätter et al. 2021, "Efficiently Teaching an
Effective Dense Retriever with Balanced Topic Aware Sampling") cluster the training points by
their current embeddings and build each mini-batch from a few whole clusters, so that the
in-batch negatives are hard. This module makes those clusters.

The algorithm is spherical k-means (Dhillon & Modha 2001, "Concept Decompositions for Large
Sparse Text Data using Clustering"): points ``x_i`` (rows of ``[N, D]``, normalised to unit
length here) and unit centroids ``mu_j``; one Lloyd iteration is

    a_i    = argmax_j  x_i · mu_j                  (assignment, ties to the lowest j)
    mu_j  <- normalise( sum_{i: a_i = j} x_i )     (a segment sum, then unit length)

Memory. The ``N × k`` similarity matrix is never formed: points are assigned ``chunk_size``
rows at a time inside a ``fori_loop`` (``(c, D) · (D, k) -> (c, k)`` per chunk) and the
segment sums are accumulated over the same chunks, so an iteration holds
``O(c·k + k·D + N)`` beyond the points themselves (``N`` for the assignment and the best
similarity of every point). The last chunk, when ``c`` does not divide ``N``, is read at the
clamped start ``N - c`` and its rows already counted by the previous chunk are masked out of
the sums, so no padded copy of the points is made.

Determinism. The segment sums are a one-hot matmul ``(k, c) · (c, D) -> (k, D)``, not a
scatter-add: GPU scatter-adds of floats use atomics whose order varies from run to run, a
matmul does not. It costs as much as the assignment matmul and runs on the matrix units.
Initialisation draws ``k`` distinct point indices with the key; a cluster left empty by an
iteration is re-seeded with a worst-served point: the ``r``-th empty cluster (in index order)
takes the point of ``r``-th lowest similarity to its own centroid (ties: lowest index), the
rule of Lloyd implementations that relocate empty clusters to far-away points.

Balance. Hard-batch samplers want equal clusters (a batch is ``B / c`` whole clusters), and
k-means clusters are not equal. :func:`balanced_clusters` runs k-means with
``k = ceil(N / c)``, orders the points by (cluster, decreasing similarity to its centroid)
and cuts that ordering into consecutive groups of exactly ``c`` points, the last group
holding the remaining ``N mod c`` (or ``c``). A cluster larger than ``c`` thus spills its
least typical points into the group that starts the next cluster; a smaller one is topped up
with the most typical points of the next cluster. Simple, deterministic and exactly
balanced; it trades some purity at group boundaries for the equal sizes.

Example::

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (1000, 16))
    >>> centroids, assignment = kmeans(x, num_clusters=8, iterations=5,
    ...                                key=jax.random.key(1), chunk_size=256)
    >>> centroids.shape, assignment.shape, assignment.dtype
    ((8, 16), (1000,), dtype('int32'))
    >>> groups = balanced_clusters(x, cluster_size=100, iterations=5, key=jax.random.key(1))
    >>> jnp.bincount(groups).tolist()
    [100, 100, 100, 100, 100, 100, 100, 100, 100, 100]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "assign",
    "balanced_clusters",
    "initial_indices",
    "kmeans",
    "kmeans_step",
]

#: Rows assigned at once: the ``(c, k)`` similarity block is ``4·c·k`` bytes (64 MiB at
#: ``c = k = 4096``).
DEFAULT_CHUNK_SIZE = 4096
_TINY = 1e-12  # norm floor: a zero row stays a zero row instead of becoming NaN


def _normalise(x: jax.Array) -> jax.Array:
    """Rows of ``x [n, D]`` scaled to unit L2 norm (zero rows stay zero), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _TINY)


def _check_points(points, name: str = "points") -> tuple[int, int]:
    shape = tuple(points.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {shape}")
    if not jnp.issubdtype(points.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {points.dtype}; cast with .astype")
    return shape


def _check_positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _sweep(
    points: jax.Array, centroids: jax.Array, chunk: int, *, accumulate: bool
) -> tuple[jax.Array, ...]:
    """One chunked pass: nearest centroid and its similarity per point, and (``accumulate``)
    the per-cluster sums and counts of the normalised points assigned to each centroid.

    ``points [N, D]``, ``centroids [k, D]`` unit rows; returns ``assignment int32[N]``,
    ``similarity float32[N]`` and, when accumulating, ``sums float32[k, D]``, ``counts
    int32[k]``.
    """
    n, d = points.shape
    k = centroids.shape[0]
    chunk = min(chunk, n)
    num_chunks = -(-n // chunk)
    cluster_ids = jnp.arange(k, dtype=jnp.int32)

    def body(i, carry):
        assignment, similarity, sums, counts = carry
        # Clamped start: the last chunk overlaps the one before when chunk does not divide N;
        # overlapping rows get the same assignment again, and are masked out of the sums.
        start = jnp.minimum(i * chunk, n - chunk)
        x = _normalise(lax.dynamic_slice_in_dim(points, start, chunk, axis=0))
        s = x @ centroids.T  # (c, D) · (D, k) -> (c, k)
        a = jnp.argmax(s, axis=1).astype(jnp.int32)  # first maximum: ties to the lowest j
        best = jnp.take_along_axis(s, a[:, None], axis=1)[:, 0]
        assignment = lax.dynamic_update_slice_in_dim(assignment, a, start, axis=0)
        similarity = lax.dynamic_update_slice_in_dim(similarity, best, start, axis=0)
        if accumulate:
            fresh = start + jnp.arange(chunk) >= i * chunk  # not counted by an earlier chunk
            member = (a[:, None] == cluster_ids[None, :]) & fresh[:, None]  # (c, k)
            # A segment sum as a matmul: deterministic on every backend (no atomics).
            sums = sums + member.astype(jnp.float32).T @ x  # (k, c) · (c, D) -> (k, D)
            counts = counts + jnp.sum(member, axis=0, dtype=jnp.int32)
        return assignment, similarity, sums, counts

    init = (
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((k, d) if accumulate else (0, d), jnp.float32),
        jnp.zeros((k,) if accumulate else (0,), jnp.int32),
    )
    out = lax.fori_loop(0, num_chunks, body, init)
    return out if accumulate else out[:2]


def _update(
    points: jax.Array, sums: jax.Array, counts: jax.Array, similarity: jax.Array
) -> jax.Array:
    """New unit centroids from the segment sums; empty clusters re-seeded (module docstring)."""
    k = sums.shape[0]
    empty = counts == 0
    # The k worst-served points, lowest similarity first (top_k puts equal values in index
    # order). N >= k is checked by the callers, so there is one for every empty cluster.
    _, worst = lax.top_k(-similarity, k)
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)  # r-th empty cluster -> r-th worst point
    reseeded = _normalise(points[worst[rank]])  # (k, D) gather: k rows, not N
    return jnp.where(empty[:, None], reseeded, _normalise(sums))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _assign(points, centroids, chunk_size):
    return _sweep(points, _normalise(centroids), chunk_size, accumulate=False)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _step(points, centroids, chunk_size):
    assignment, similarity, sums, counts = _sweep(
        points, _normalise(centroids), chunk_size, accumulate=True
    )
    return _update(points, sums, counts, similarity), assignment, similarity


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations", "chunk_size"))
def _kmeans(points, key, num_clusters, iterations, chunk_size):
    idx = jax.random.choice(key, points.shape[0], (num_clusters,), replace=False)
    centroids = _normalise(points[idx])

    def iteration(_, centroids):
        assignment, similarity, sums, counts = _sweep(
            points, centroids, chunk_size, accumulate=True
        )
        return _update(points, sums, counts, similarity)

    centroids = lax.fori_loop(0, iterations, iteration, centroids)
    assignment, similarity = _sweep(points, centroids, chunk_size, accumulate=False)
    return centroids, assignment, similarity


def initial_indices(key: jax.Array, num_points: int, num_clusters: int) -> jax.Array:
    """The ``num_clusters`` distinct point indices :func:`kmeans` starts from (``int32[k]``).

    ``jax.random.choice(key, N, (k,), replace=False)``; exposed so that a reference
    implementation can start from the same centroids.
    """
    return jax.random.choice(key, num_points, (num_clusters,), replace=False)


def assign(
    points: jax.Array, centroids: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid by cosine similarity, ``chunk_size`` points at a time.

    ``a_i = argmax_j x̂_i · μ̂_j`` (hats: unit rows; ties go to the lowest ``j``), computed
    per chunk as ``(c, D) · (D, k) -> (c, k)``: memory ``O(c·k + N)``, never ``N × k``.

    Args:
      points: ``[N, D]`` float.
      centroids: ``[k, D]`` float.
      chunk_size: rows per chunk ``c``; any value (``c > N`` means one chunk). Results do
        not depend on it.

    Returns:
      ``(assignment int32[N], similarity float32[N])``: the nearest centroid and the cosine
      similarity to it.

    Example::

        >>> a, s = assign(jnp.eye(3), jnp.array([[0.0, 1, 0], [1, 0, 0]]), chunk_size=2)
        >>> a.tolist(), s.tolist()
        ([1, 0, 0], [1.0, 1.0, 0.0])
    """
    n, d = _check_points(points)
    k, dc = _check_points(centroids, "centroids")
    if dc != d:
        raise ValueError(f"centroids have dimension {dc} but points have {d}; use the same D")
    _check_positive("chunk_size", chunk_size)
    return _assign(points, centroids, chunk_size=min(chunk_size, n))


def kmeans_step(
    points: jax.Array, centroids: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Lloyd iteration of spherical k-means, chunked (see the module docstring).

    Assigns every point to its nearest centroid (as :func:`assign`), then returns the new
    centroids ``normalise(sum of the points assigned to j)``, an empty cluster re-seeded with
    a worst-served point. Memory ``O(c·k + k·D + N)``.

    Args:
      points: ``[N, D]`` float, ``N >= k``.
      centroids: ``[k, D]`` float, the current centroids.
      chunk_size: rows per chunk.

    Returns:
      ``(new_centroids float32[k, D], assignment int32[N], similarity float32[N])``, the
      assignment and similarities being those to the *input* centroids.
    """
    n, d = _check_points(points)
    k, dc = _check_points(centroids, "centroids")
    if dc != d:
        raise ValueError(f"centroids have dimension {dc} but points have {d}; use the same D")
    if k > n:
        raise ValueError(f"{k} centroids for {n} points: use at most {n} clusters")
    _check_positive("chunk_size", chunk_size)
    return _step(points, centroids, chunk_size=min(chunk_size, n))


def kmeans(
    points: jax.Array,
    *,
    num_clusters: int,
    iterations: int,
    key: jax.Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Spherical k-means (cosine similarity), chunked so that no ``N × k`` array exists.

    Starts from the ``k`` distinct points :func:`initial_indices` draws with ``key``, runs
    ``iterations`` Lloyd iterations (:func:`kmeans_step`), and assigns every point to the
    final centroids. Deterministic given ``(points, key)``; the result does not depend on
    ``chunk_size`` beyond float rounding of the sums. Memory ``O(N·D + k·D + c·k)``; time
    ``O(iterations · N·k·D)`` (two matmuls of that size per iteration).

    Args:
      points: ``[N, D]`` float embeddings; normalised to unit rows here (ours already are).
      num_clusters: ``k``, at most ``N``.
      iterations: Lloyd iterations, ``>= 0`` (0: the initial centroids).
      key: a ``jax.random`` key.
      chunk_size: rows assigned at once (``c``); memory ``4·c·k`` bytes per block.

    Returns:
      ``(centroids float32[k, D] unit rows, assignment int32[N])``, each point assigned to
      its nearest returned centroid.

    Example::

        >>> x = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> _, a = kmeans(x, num_clusters=2, iterations=3, key=jax.random.key(0))
        >>> bool(a[0] == a[1]) and bool(a[2] == a[3]) and bool(a[0] != a[2])
        True
    """
    centroids, assignment, _ = _kmeans_checked(points, num_clusters, iterations, key, chunk_size)
    return centroids, assignment


def _kmeans_checked(points, num_clusters, iterations, key, chunk_size):
    n, _ = _check_points(points)
    _check_positive("num_clusters", num_clusters)
    _check_positive("iterations", iterations, minimum=0)
    _check_positive("chunk_size", chunk_size)
    if num_clusters > n:
        raise ValueError(f"{n} points cannot form {num_clusters} clusters: use num_clusters <= {n}")
    return _kmeans(
        points,
        key,
        num_clusters=num_clusters,
        iterations=iterations,
        chunk_size=min(chunk_size, n),
    )


def balanced_clusters(
    points: jax.Array,
    *,
    cluster_size: int,
    iterations: int,
    key: jax.Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """A partition of the points into groups of exactly ``cluster_size`` similar points.

    k-means with ``k = ceil(N / c)`` clusters (:func:`kmeans`), then the points sorted by
    (cluster, decreasing similarity to its centroid) and the sorted order cut into
    consecutive groups of ``c``: group ``g`` holds sorted positions ``[g·c, (g+1)·c)``. Every
    group has exactly ``c`` members except the last, which has ``N - (G-1)·c`` (``G =
    ceil(N/c)``). See the module docstring for why this simple cut.

    Args:
      points: ``[N, D]`` float embeddings.
      cluster_size: ``c``, ``1 <= c <= N``.
      iterations, key, chunk_size: as for :func:`kmeans`.

    Returns:
      ``int32[N]`` group id of every point, in ``0 .. ceil(N/c) - 1``.

    Example::

        >>> x = jax.random.normal(jax.random.key(0), (10, 4))
        >>> g = balanced_clusters(x, cluster_size=4, iterations=2, key=jax.random.key(0))
        >>> jnp.bincount(g).tolist()
        [4, 4, 2]
    """
    n, _ = _check_points(points)
    _check_positive("cluster_size", cluster_size)
    if cluster_size > n:
        raise ValueError(
            f"cluster_size {cluster_size} exceeds the {n} points: use cluster_size <= {n}"
        )
    _, assignment, similarity = _kmeans_checked(
        points, -(-n // cluster_size), iterations, key, chunk_size
    )
    return _cut(assignment, similarity, cluster_size=cluster_size)


@functools.partial(jax.jit, static_argnames=("cluster_size",))
def _cut(assignment, similarity, cluster_size):
    n = assignment.shape[0]
    # lexsort: the last key is the primary one; stable, so equal similarities keep index order.
    order = jnp.lexsort((-similarity, assignment))
    group = jnp.arange(n, dtype=jnp.int32) // cluster_size
    return jnp.zeros((n,), jnp.int32).at[order].set(group, unique_indices=True)
