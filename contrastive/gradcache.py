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

Chunk layout. With ``n = B // chunk_size`` full chunks, chunk ``k`` holds rows
``k, k + n, k + 2n, ...`` (a strided split: ``batch[:n*c].reshape(c, n, ...)`` swapped to
``(n, c, ...)``). When the batch is sharded over devices along its first axis and
``chunk_size`` is a multiple of the device count, every chunk is spread evenly over all
devices and the split needs no communication. A ragged tail of ``B % chunk_size`` rows is
encoded as one extra, smaller chunk (never dropped). :func:`encode_in_chunks` is the
differentiable reference with the same chunks and keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
EncodeFn = Callable[[PyTree, PyTree, jax.Array | None], PyTree]
LossFn = Callable[[PyTree, PyTree], Any]

__all__ = ["value_and_grad", "encode_in_chunks", "chunk_keys", "num_chunks"]


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
        # Strided split: row j*n + k goes to chunk k (see the module docstring).
        return jnp.swapaxes(x.reshape(chunk_size, n, *x.shape[1:]), 0, 1)

    main = jax.tree_util.tree_map(full, batch)
    tail = jax.tree_util.tree_map(lambda x: x[n * chunk_size :], batch) if rem else None
    return main, tail


def _merge(main: PyTree, tail: PyTree | None) -> PyTree:
    """Inverse of :func:`_split`: chunks [n, c, ...] (+ tail) -> [B, ...]."""

    def full(x):
        return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    out = jax.tree_util.tree_map(full, main)
    if tail is None:
        return out
    return jax.tree_util.tree_map(lambda a, t: jnp.concatenate([a, t], axis=0), out, tail)


def _acc_dtype(p) -> jnp.dtype:
    dtype = jnp.result_type(p)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _split_keys(keys: jax.Array | None, n_full: int) -> tuple[Any, Any]:
    if keys is None:
        return None, None
    return keys[:n_full], (keys[n_full] if keys.shape[0] > n_full else None)


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
    b = _batch_size(batch)
    _check_chunk_size(chunk_size, b)
    main, tail = _split(batch, chunk_size)
    keys_main, key_tail = _split_keys(chunk_keys(key, b, chunk_size), b // chunk_size)
    emb = jax.lax.map(lambda a: encode_fn(params, a[0], a[1]), (main, keys_main))
    emb_tail = None if tail is None else encode_fn(params, tail, key_tail)
    return _merge(emb, emb_tail)


def value_and_grad(
    encode_fn: EncodeFn,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    has_aux: bool = False,
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

    Returns:
      ``f(params, batch, key=None) -> (loss, grads)`` (``((loss, aux), grads)`` with
      ``has_aux``), equal to ``jax.value_and_grad(lambda p: loss_fn(p, encode_in_chunks(
      encode_fn, p, batch, key, chunk_size=c)))(params)``: the same chunks, the same keys.
    """

    def f(params: PyTree, batch: PyTree, key: jax.Array | None = None):
        b = _batch_size(batch)
        _check_chunk_size(chunk_size, b)
        n_full = b // chunk_size
        main, tail = _split(batch, chunk_size)
        keys_main, key_tail = _split_keys(chunk_keys(key, b, chunk_size), n_full)

        # Pass 1: embeddings only. Nothing here is differentiated, so no activation
        # outlives its chunk's iteration of the map.
        def embed(p):
            emb = jax.lax.map(lambda a: encode_fn(p, a[0], a[1]), (main, keys_main))
            emb_tail = None if tail is None else encode_fn(p, tail, key_tail)
            return emb, emb_tail

        emb_main, emb_tail = embed(jax.lax.stop_gradient(params))
        embeddings = jax.lax.stop_gradient(_merge(emb_main, emb_tail))

        # Full-batch loss: its gradient w.r.t. params (temperature, bias) and embeddings.
        out, (g_params, g_emb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=has_aux)(
            params, embeddings
        )
        g_main, g_tail = _split(g_emb, chunk_size)

        # Pass 2: re-encode each chunk under vjp with its cached embedding gradient.
        def pull_back(chunk, k, g):
            _, vjp = jax.vjp(lambda p: encode_fn(p, chunk, k), params)
            return vjp(g)[0]

        def body(acc, a):
            gp = pull_back(*a)
            return jax.tree_util.tree_map(lambda s, g: s + g.astype(s.dtype), acc, gp), None

        # Accumulate in float32 at least, whatever the parameter dtype.
        acc = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, _acc_dtype(p)), params)
        acc, _ = jax.lax.scan(body, acc, (main, keys_main, g_main))
        if tail is not None:
            gp = pull_back(tail, key_tail, g_tail)
            acc = jax.tree_util.tree_map(lambda s, g: s + g.astype(s.dtype), acc, gp)
        grads = jax.tree_util.tree_map(
            lambda p, g, a: (g + a).astype(p.dtype), params, g_params, acc
        )
        return out, grads

    return f
