"""Gradient caching (GradCache; Gao et al. 2021, arXiv 2101.06983) for dual encoders.

A contrastive loss couples every pair in the batch, so the usual trick of accumulating
gradients over micro-batches changes the objective. Gradient caching keeps the full-batch
objective while holding the encoder activations of only one chunk at a time:

1. embed every chunk with no activations kept (``lax.map``; nothing is differentiated),
2. take the loss and ``dL/d embeddings`` on the whole batch at once,
3. re-run each chunk under ``jax.vjp`` with the same parameters and the same per-chunk key,
   pull that chunk's cached embedding gradient back and accumulate parameter gradients.

The price is one extra forward pass of the encoder; activation memory is that of one chunk
plus the ``[B, D]`` embeddings and their gradients.

Chunk layout. With ``n = B // chunk_size`` full chunks, chunk ``k`` holds the contiguous
rows ``k c .. (k + 1) c - 1`` (a reshape: no copy of the inputs). The train step runs the
cache inside ``shard_map``, on each device's own rows, so a chunk never spans devices. (A
strided split, which spreads each chunk over the devices of a batch sharded under plain
``jit``, costs two copies of the inputs: for uint8 CLIP images that was three times the
memory per row.) A ragged tail of ``B % chunk_size`` rows is encoded as one extra,
smaller chunk (never dropped). :func:`encode_in_chunks` is the differentiable reference
with the same chunks and keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
EncodeFn = Callable[[PyTree, PyTree, jax.Array | None], PyTree]
LossFn = Callable[[PyTree, PyTree], Any]

__all__ = [
    "value_and_grad",
    "towers_value_and_grad",
    "encode_in_chunks",
    "encode_towers_in_chunks",
    "chunk_keys",
    "num_chunks",
    "accumulator_dtype",
]


def _batch_size(batch: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("gradcache: the batch has no arrays; pass a pytree of [B, ...] arrays.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(
            "gradcache: every array in the batch needs the same leading batch axis, got shapes "
            f"{shapes}."
        )
    return sizes.pop()


def _check_chunk_size(chunk_size: int, batch_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"gradcache: chunk_size must be a positive int, got {chunk_size!r}.")
    if chunk_size > batch_size:
        raise ValueError(
            f"gradcache: chunk_size={chunk_size} is larger than the batch of {batch_size} rows; "
            "use a chunk_size <= the batch size (or turn gradient caching off)."
        )


def num_chunks(batch_size: int, chunk_size: int) -> int:
    """Number of chunks (full ones plus a ragged tail, if any) for a batch."""
    _check_chunk_size(chunk_size, batch_size)
    return -(-batch_size // chunk_size)


def chunk_keys(key: jax.Array | None, batch_size: int, chunk_size: int) -> jax.Array | None:
    """The per-chunk keys: ``jax.random.split(key, num_chunks)``, or None without a key."""
    if key is None:
        return None
    return jax.random.split(key, num_chunks(batch_size, chunk_size))


def _split(batch: PyTree, chunk_size: int) -> tuple[PyTree, PyTree | None]:
    """``batch`` [B, ...] -> (full chunks [n, c, ...], ragged tail [B % c, ...] or None)."""
    b = _batch_size(batch)
    n, rem = divmod(b, chunk_size)

    def full(x):
        x = x[: n * chunk_size] if rem else x
        return x.reshape(n, chunk_size, *x.shape[1:])  # contiguous chunks (module docstring)

    main = jax.tree_util.tree_map(full, batch)
    tail = jax.tree_util.tree_map(lambda x: x[n * chunk_size :], batch) if rem else None
    return main, tail


def _merge(main: PyTree, tail: PyTree | None) -> PyTree:
    """Inverse of :func:`_split`: chunks [n, c, ...] (+ tail) -> [B, ...]."""

    def full(x):
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    out = jax.tree_util.tree_map(full, main)
    if tail is None:
        return out
    return jax.tree_util.tree_map(lambda a, t: jnp.concatenate([a, t], axis=0), out, tail)


def accumulator_dtype(x: Any) -> jnp.dtype:
    """The dtype gradients of ``x`` are summed in: float32 at least for floating ``x``
    (bfloat16 parameters), its own dtype otherwise."""
    dtype = jnp.result_type(x)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _split_keys(keys: jax.Array | None, n_full: int) -> tuple[Any, Any]:
    if keys is None:
        return None, None
    return keys[:n_full], (keys[n_full] if keys.shape[0] > n_full else None)


class _Chunks(NamedTuple):
    """One tower's inputs cut into chunks: ``main`` [n, c, ...], ``tail`` [B % c, ...] or
    None, and their keys."""

    main: PyTree
    tail: PyTree | None
    keys_main: jax.Array | None
    key_tail: jax.Array | None


def _chunks(batch: PyTree, key: jax.Array | None, chunk_size: int) -> _Chunks:
    b = _batch_size(batch)
    _check_chunk_size(chunk_size, b)
    main, tail = _split(batch, chunk_size)
    keys_main, key_tail = _split_keys(chunk_keys(key, b, chunk_size), b // chunk_size)
    return _Chunks(main, tail, keys_main, key_tail)


def _encode(encode_fn: EncodeFn, params: PyTree, c: _Chunks) -> PyTree:
    """Every chunk through ``encode_fn`` (``lax.map``: one chunk's activations at a time)."""
    emb = jax.lax.map(lambda a: encode_fn(params, a[0], a[1]), (c.main, c.keys_main))
    emb_tail = None if c.tail is None else encode_fn(params, c.tail, c.key_tail)
    return _merge(emb, emb_tail)


def _add(acc: PyTree, g: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s, v: s + v.astype(s.dtype), acc, g)


def _pull_back(encode_fn: EncodeFn, params: PyTree, c: _Chunks, g_emb: PyTree, acc: PyTree):
    """Add every chunk's ``vjp`` of ``encode_fn`` at its cached embedding gradient to ``acc``."""
    g_main, g_tail = _split(g_emb, jax.tree_util.tree_leaves(c.main)[0].shape[1])

    def pull(chunk, k, g):
        _, vjp = jax.vjp(lambda p: encode_fn(p, chunk, k), params)
        return vjp(g)[0]

    acc, _ = jax.lax.scan(
        lambda s, a: (_add(s, pull(*a)), None), acc, (c.main, c.keys_main, g_main)
    )
    if c.tail is not None:
        acc = _add(acc, pull(c.tail, c.key_tail, g_tail))
    return acc


def _tower_keys(key: jax.Array | None, towers: int) -> list[jax.Array | None]:
    """Tower ``t``'s key: ``fold_in(key, t)``, so that the towers' dropout differs."""
    return [None if key is None else jax.random.fold_in(key, t) for t in range(towers)]


def encode_in_chunks(
    encode_fn: EncodeFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array | None = None,
    *,
    chunk_size: int,
) -> PyTree:
    """Embed ``batch`` chunk by chunk with per-chunk keys; differentiable (the reference).

    Args:
      encode_fn: ``encode_fn(params, chunk, key) -> embeddings`` ([c, ...] -> [c, ...]).
      params: parameters pytree.
      batch: pytree of [B, ...] arrays.
      key: PRNG key split into one key per chunk (see :func:`chunk_keys`), or None.
      chunk_size: rows per chunk ``c``.

    Returns:
      The embeddings pytree, [B, ...] leaves, rows in the order of ``batch``.
    """
    return _encode(encode_fn, params, _chunks(batch, key, chunk_size))


def encode_towers_in_chunks(
    encode_fns: Sequence[EncodeFn],
    params: PyTree,
    batch: Sequence[PyTree],
    key: jax.Array | None = None,
    *,
    chunk_size: int,
) -> tuple[PyTree, ...]:
    """:func:`encode_in_chunks` per tower: ``batch[t]`` through ``encode_fns[t]`` with the
    key ``fold_in(key, t)``; towers may have different batch sizes. Differentiable."""
    _check_towers(encode_fns, batch)
    keys = _tower_keys(key, len(encode_fns))
    return tuple(
        encode_in_chunks(f, params, inputs, k, chunk_size=chunk_size)
        for f, inputs, k in zip(encode_fns, batch, keys, strict=True)
    )


def _check_towers(encode_fns: Sequence[EncodeFn], batch: Sequence[PyTree]) -> None:
    if not isinstance(batch, tuple | list) or len(batch) != len(encode_fns):
        raise ValueError(
            f"gradcache: {len(encode_fns)} towers need a batch of {len(encode_fns)} parts (one "
            f"per tower), got {type(batch).__name__} {batch!r:.80}."
        )


def _cached_value_and_grad(
    encode_fns, loss_fn, chunk_size, has_aux, keep_accumulator_dtype, params, batch, keys
):
    """The gradient cache over towers; ``batch[t]`` and ``keys[t]`` belong to tower ``t``."""
    chunks = [_chunks(inputs, k, chunk_size) for inputs, k in zip(batch, keys, strict=True)]

    # Pass 1: embeddings only. Nothing here is differentiated, so no activation outlives
    # its chunk's iteration of the map.
    frozen = jax.lax.stop_gradient(params)
    embeddings = tuple(
        jax.lax.stop_gradient(_encode(f, frozen, c))
        for f, c in zip(encode_fns, chunks, strict=True)
    )

    # Full-batch loss: its gradient w.r.t. params (temperature, bias) and embeddings.
    out, (g_params, g_emb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=has_aux)(
        params, embeddings
    )

    # Pass 2: re-encode each chunk under vjp with its cached embedding gradient. The sum
    # is float32 at least, whatever the parameter dtype, and is rounded to that dtype once
    # (here, or by the caller); zeros_like keeps p's varying mesh axes inside shard_map,
    # as the scan carry needs.
    acc = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, accumulator_dtype(p)), params)
    for f, c, g in zip(encode_fns, chunks, g_emb, strict=True):
        acc = _pull_back(f, params, c, g, acc)
    grads = _add(acc, g_params)
    if keep_accumulator_dtype:
        return out, grads
    return out, jax.tree_util.tree_map(lambda p, g: g.astype(p.dtype), params, grads)


def value_and_grad(
    encode_fn: EncodeFn,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    has_aux: bool = False,
    keep_accumulator_dtype: bool = False,
) -> Callable[..., tuple[Any, PyTree]]:
    """Gradient-cached ``value_and_grad`` of ``loss_fn(params, encode(params, batch))``.

    Args:
      encode_fn: ``encode_fn(params, chunk, key) -> embeddings``: any pytree of [c, ...]
        arrays with a leading batch axis. ``key`` is one PRNG key per chunk (or None);
        the function may ignore it.
      loss_fn: ``loss_fn(params, embeddings) -> scalar`` on the whole batch [B, ...]
        (``params`` so that a temperature and a bias can be learned). With ``has_aux``
        it returns ``(scalar, aux)``.
      chunk_size: rows per encoder chunk ``c``; activation memory scales with ``c``, not B.
      has_aux: as in ``jax.value_and_grad``.
      keep_accumulator_dtype: return each gradient in its accumulator dtype (float32 for
        bfloat16 parameters; see :func:`accumulator_dtype`), not rounded to the parameter's
        dtype: for a caller that sums further, e.g. across devices, before rounding once.

    Returns:
      ``f(params, batch, key=None) -> (loss, grads)`` (``((loss, aux), grads)`` with
      ``has_aux``), equal to ``jax.value_and_grad(lambda p: loss_fn(p, encode_in_chunks(
      encode_fn, p, batch, key, chunk_size=c)))(params)``: the same chunks, the same keys.
    """

    def f(params: PyTree, batch: PyTree, key: jax.Array | None = None):
        def loss_one(p, emb):
            return loss_fn(p, emb[0])

        return _cached_value_and_grad(
            (encode_fn,),
            loss_one,
            chunk_size,
            has_aux,
            keep_accumulator_dtype,
            params,
            (batch,),
            (key,),
        )

    return f


def towers_value_and_grad(
    encode_fns: Sequence[EncodeFn],
    loss_fn: LossFn,
    *,
    chunk_size: int,
    has_aux: bool = False,
    keep_accumulator_dtype: bool = False,
) -> Callable[..., tuple[Any, PyTree]]:
    """:func:`value_and_grad` for towers whose batches differ in size (CLIP with extra
    text negatives: ``B`` images, ``M >= B`` captions).

    ``f(params, batch, key=None)`` with ``batch = (inputs_1, ..., inputs_k)``: tower ``t``
    embeds ``batch[t]`` (its own leading size) with ``encode_fns[t]`` in chunks of
    ``chunk_size`` rows and the key ``fold_in(key, t)``; ``loss_fn(params, (emb_1, ...,
    emb_k))``. Equal to plain autodiff through :func:`encode_towers_in_chunks`.
    ``has_aux`` and ``keep_accumulator_dtype``: as in :func:`value_and_grad`.
    """

    def f(params: PyTree, batch: Sequence[PyTree], key: jax.Array | None = None):
        _check_towers(encode_fns, batch)
        keys = _tower_keys(key, len(encode_fns))
        return _cached_value_and_grad(
            tuple(encode_fns),
            loss_fn,
            chunk_size,
            has_aux,
            keep_accumulator_dtype,
            params,
            tuple(batch),
            keys,
        )

    return f
