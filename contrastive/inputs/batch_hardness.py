"""How hard a batch's negatives are: the metrics that compare random and hard batches.

Both measure, per anchor of a batch, how close its in-batch negatives are:

- :func:`hard_negative_count` (the ``shapes`` data set): the batch-mates whose caption is
  exactly one attribute away, counted in ``O(B)`` without comparing pairs;
- :func:`nearest_negative_rank` (any data set): the rank of the anchor's hardest in-batch
  negative among all ``N`` examples by embedding similarity, 1 when the batch holds its
  nearest neighbour (the NGAME notion of hardness), computed chunk by chunk.

The sampler whose batches they measure is :class:`contrastive.inputs.hard_batches.HardBatchOrder`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hard_negative_count", "nearest_negative_rank"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def hard_negative_count(caption_ids: np.ndarray) -> np.ndarray:
    """Per anchor, the batch-mates whose ``shapes`` caption is exactly one attribute away.

    ``n1(i) = #{j : d(i, j) = 1}`` with ``d`` the number of the five attributes (shape,
    colour, size, position, texture) that differ. Counted without comparing pairs: ``j`` is
    one attribute ``t`` away from ``i`` iff it agrees on the other four and differs on
    ``t``; the ``j`` agreeing with ``i`` on all but ``t`` (``t`` free) are counted by one
    ``bincount`` of the caption with ``t`` masked, those agreeing on all five (same caption,
    ``i`` itself included) by another, and the five attributes give disjoint sets, so

        n1(i) = sum_t ( #{j : key_t(j) = key_t(i)} - #{j : id(j) = id(i)} ).

    ``O(B)`` time and memory. Expected value for a random batch of the ``train`` split:
    ``(B - 1) / 189`` (:func:`contrastive.data.captioned_shapes.expected_neighbours`).

    Args:
      caption_ids: ``int[B]`` caption ids of a batch (``CaptionedShapes(...)[i]["caption_id"]``).

    Returns:
      ``int64[B]``.

    Example::

        >>> from contrastive.data.captioned_shapes import caption_id
        >>> ids = [caption_id(0, 1, 0, 4, 0), caption_id(0, 1, 0, 4, 2),   # texture differs
        ...        caption_id(0, 1, 2, 4, 2), caption_id(0, 1, 0, 4, 0)]   # size; a duplicate
        >>> hard_negative_count(ids).tolist()
        [1, 3, 1, 1]
    """
    from contrastive.data.captioned_shapes import ATTRIBUTES, NUM_CAPTIONS, caption_attributes

    ids = np.asarray(caption_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"caption_ids must be int[B], got {ids.dtype}{list(ids.shape)}")
    attrs = caption_attributes(ids)
    radix = [len(v) for v in ATTRIBUTES.values()]
    same = np.bincount(ids, minlength=NUM_CAPTIONS)[ids]
    total = np.zeros(len(ids), np.int64)
    for t in range(len(radix)):
        # The caption's mixed-radix id with attribute t removed: equal iff the other four are.
        key = np.zeros(len(ids), np.int64)
        for a, (name, r) in enumerate(zip(ATTRIBUTES, radix, strict=True)):
            if a != t:
                key = key * r + attrs[name]
        total += np.bincount(key)[key] - same
    return total


@functools.partial(jax.jit, static_argnames=("chunk",))
def _count_closer(embeddings, anchors, threshold, excluded, chunk):
    """Per anchor, ``#{k not in excluded : e_anchor · e_k > threshold}``, chunk by chunk."""
    n = embeddings.shape[0]

    def body(i, counts):
        # Clamped start, as in contrastive.inputs.clustering; rows an earlier chunk saw are masked.
        start = jnp.minimum(i * chunk, n - chunk)
        block = jax.lax.dynamic_slice_in_dim(embeddings, start, chunk, axis=0)
        s = anchors @ block.T  # (B, D) · (D, c) -> (B, c)
        rows = start + jnp.arange(chunk)
        fresh = (rows >= i * chunk)[None, :]
        keep = fresh & (rows != excluded[:, :1]) & (rows != excluded[:, 1:])  # (B, c)
        return counts + jnp.sum((s > threshold[:, None]) & keep, axis=1, dtype=jnp.int32)

    zeros = jnp.zeros(anchors.shape[0], jnp.int32)
    return jax.lax.fori_loop(0, -(-n // chunk), body, zeros)


def nearest_negative_rank(
    embeddings: np.ndarray | jax.Array, batch: np.ndarray, *, chunk_size: int = 8192
) -> np.ndarray:
    """Rank of each anchor's hardest in-batch negative among all ``N`` examples.

    For anchor ``i`` of the batch with similarities ``s_ik = e_i · e_k`` (the embeddings as
    given; ours are L2-normalised), the hardest in-batch negative is ``j* = argmax_{j in
    batch, j != i} s_ij`` and its rank is ``1 + #{k not in {i, j*} : s_ik > s_ij*}`` over the
    whole data set: 1 when the batch holds the anchor's nearest neighbour, about ``N / B``
    for a random batch (the best of ``B - 1`` uniform draws), the NGAME notion of how hard
    the in-batch negatives are. The ``B × N`` similarities are never held: ``(B, D) · (D, c)``
    per chunk of ``c`` examples, counted and dropped. (``i`` and ``j*`` are excluded by
    index, so float rounding of their own products cannot shift the rank.)

    Args:
      embeddings: ``[N, D]`` float, one row per training example.
      batch: ``int[B]`` distinct example indices (a batch), ``B >= 2``.
      chunk_size: examples compared at once.

    Returns:
      ``int64[B]`` ranks, in ``1 .. N - 1``.

    Example::

        >>> e = np.eye(4, dtype=np.float32) + 0.1 * np.arange(4)[:, None]
        >>> nearest_negative_rank(e, np.array([0, 3])).tolist()  # 3 is 0's nearest; not vice versa
        [1, 3]
    """
    emb = jnp.asarray(embeddings)
    if emb.ndim != 2 or not jnp.issubdtype(emb.dtype, jnp.floating):
        raise ValueError(f"embeddings must be float [N, D], got {emb.dtype}{list(emb.shape)}")
    idx = np.asarray(batch)
    n = emb.shape[0]
    if idx.ndim != 1 or idx.size < 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"batch must be int[B] with B >= 2, got {idx.dtype}{list(idx.shape)}")
    if idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != idx.size:
        raise ValueError(f"batch must hold distinct indices in [0, {n})")
    chunk = min(_check_int("chunk_size", chunk_size, 1), n)
    emb = emb.astype(jnp.float32)
    anchors = emb[jnp.asarray(idx)]
    s = anchors @ anchors.T  # (B, D) · (D, B) -> (B, B): the batch only
    s = jnp.where(jnp.eye(idx.size, dtype=bool), -jnp.inf, s)
    hardest = jnp.argmax(s, axis=1)  # position in the batch of j*
    threshold = jnp.take_along_axis(s, hardest[:, None], axis=1)[:, 0]
    excluded = jnp.stack([jnp.asarray(idx), jnp.asarray(idx)[hardest]], axis=1)  # (B, 2)
    closer = _count_closer(emb, anchors, threshold, excluded.astype(jnp.int32), chunk=chunk)
    return 1 + np.asarray(closer, np.int64)
