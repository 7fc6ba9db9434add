"""Gradient caching: equality with the plain step, ragged chunks, validation, memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
from contrastive.step import gradcache
from tests.loss_cases import assert_close

RTOL_VALUE, RTOL_GRAD = 1e-5, 1e-4


def _toy_params(key, d_in=5, hidden=16, d_out=4):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
        "w2": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
        "log_t": jnp.log(jnp.float32(0.2)),
    }


def _toy_encode(p, chunk, key):
    """Two views through one tower, dropout on the hidden layer when a key is given."""
    outs = []
    for i, v in enumerate(chunk):
        h = jnp.tanh(v @ p["w1"])  # (c, d_in) · (d_in, hidden) -> (c, hidden)
        if key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 0.7, h.shape)
            h = jnp.where(keep, h / 0.7, 0.0)
        z = h @ p["w2"]  # (c, hidden) · (hidden, d_out) -> (c, d_out)
        outs.append(z / jnp.linalg.norm(z, axis=-1, keepdims=True))
    return tuple(outs)


def _toy_loss(p, emb):
    # The dense oracle: this file tests the cache, not the loss.
    return losses.reference.infonce(emb[0], emb[1], temperature=jnp.exp(p["log_t"]))


def _batch(key, b, d_in=5):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (b, d_in)), jax.random.normal(k2, (b, d_in))


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(2, 24),
    chunk=st.integers(1, 24),
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cached_equals_reference(b, chunk, dropout, seed):
    """Any batch and chunk size (dividing or not): the cached result equals autodiff."""
    chunk = min(chunk, b)
    key = jax.random.key(seed)
    params, batch = _toy_params(key), _batch(jax.random.fold_in(key, 1), b)
    drop_key = jax.random.fold_in(key, 2) if dropout else None

    cached = gradcache.value_and_grad(_toy_encode, _toy_loss, chunk_size=chunk)

    def plain(p):
        emb = gradcache.encode_in_chunks(_toy_encode, p, batch, drop_key, chunk_size=chunk)
        return _toy_loss(p, emb)

    # One compilation for both (the cost of this test is compiling).
    both = jax.jit(lambda p: (cached(p, batch, drop_key), jax.value_and_grad(plain)(p)))
    (loss, grads), (ref_loss, ref_grads) = both(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL_VALUE)
    assert_close(grads, ref_grads, rtol=RTOL_GRAD)


def test_without_keys_equals_unchunked_plain_step():
    """No dropout: chunking is invisible, the result is the ordinary value_and_grad."""
    params, batch = _toy_params(jax.random.key(0)), _batch(jax.random.key(1), 30)
    cached = gradcache.value_and_grad(_toy_encode, _toy_loss, chunk_size=8)  # ragged: 30 % 8
    plain = jax.value_and_grad(lambda p: _toy_loss(p, _toy_encode(p, batch, None)))
    (loss, grads), (ref_loss, ref_grads) = jax.jit(lambda p: (cached(p, batch), plain(p)))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL_VALUE)
    assert_close(grads, ref_grads, rtol=RTOL_GRAD)


def test_chunks_cover_every_row_once():
    """The strided split and its inverse put every row back where it was (ragged too)."""
    x = jnp.arange(23 * 2).reshape(23, 2)
    emb = gradcache.encode_in_chunks(lambda p, c, k: c * 1, None, x, chunk_size=5)
    np.testing.assert_array_equal(emb, x)
    keys = gradcache.chunk_keys(jax.random.key(0), 23, 5)
    assert keys.shape == (5,)


def test_has_aux():
    params, batch = _toy_params(jax.random.key(0)), _batch(jax.random.key(1), 8)

    def loss_aux(p, emb):
        return _toy_loss(p, emb), {"mean_x": jnp.mean(emb[0])}

    f = jax.jit(gradcache.value_and_grad(_toy_encode, loss_aux, chunk_size=4, has_aux=True))
    (loss, aux), _ = f(params, batch)
    np.testing.assert_allclose(loss, _toy_loss(params, _toy_encode(params, batch, None)), 1e-5)
    assert set(aux) == {"mean_x"}


@pytest.mark.parametrize(
    ("chunk", "match"), [(9, "larger than the batch"), (0, "positive int"), (2.0, "positive int")]
)
def test_bad_chunk_size_is_a_clear_error(chunk, match):
    params, batch = _toy_params(jax.random.key(0)), _batch(jax.random.key(1), 8)
    with pytest.raises(ValueError, match=match):
        gradcache.value_and_grad(_toy_encode, _toy_loss, chunk_size=chunk)(params, batch)


def test_mismatched_batch_axes_are_a_clear_error():
    params = _toy_params(jax.random.key(0))
    batch = (jnp.ones((8, 5)), jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="same leading batch axis"):
        gradcache.value_and_grad(_toy_encode, _toy_loss, chunk_size=2)(params, batch)


def bf16_ulps(x, ref) -> float:
    """The largest elementwise ``|x - ref|`` over two pytrees, in units of the bfloat16
    spacing at each element of ``ref`` (rounded to bfloat16)."""

    def one(a, r):
        r = np.asarray(r, jnp.bfloat16)
        ulp = np.spacing(np.abs(r)).astype(np.float64)
        return float(np.max(np.abs(np.asarray(a, np.float64) - r.astype(np.float64)) / ulp))

    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, x, ref)))


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(120, 300),
    chunk=st.integers(3, 12),
    d_in=st.integers(2, 8),
    d_out=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_bfloat16_params_are_rounded_once_after_a_float32_sum(b, chunk, d_in, d_out, seed):
    """bfloat16 parameters, float32 compute (by promotion), 10 to 100 chunks (the last
    often ragged): the gradients are the exact sum over chunks, rounded to bfloat16 once.

    The case is exact by construction: small-integer inputs, weights and embedding
    gradients make each chunk's gradient an integer below 256 (exact in float32 and in
    bfloat16, so its own rounding to the parameter dtype is a no-op), and their sum
    exact in float32. The reference is that sum taken in float64 on the host, rounded
    once. A bfloat16 accumulator instead rounds after every chunk once the sums pass 256,
    and misses by several ulps.
    """
    kx, kt, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.randint(kx, (b, d_in), 1, 4).astype(jnp.float32)
    target = jax.random.randint(kt, (b, d_out), 1, 4).astype(jnp.float32)
    params = {
        "w": jax.random.randint(kw, (d_in, d_out), 1, 4).astype(jnp.bfloat16),
        "scale": jnp.bfloat16(1.0),
    }

    def encode(p, c, key):
        return c @ p["w"]  # (c, d_in) · (d_in, d_out) -> (c, d_out), float32

    def loss(p, emb):
        # dL/d emb = target (scale = 1); dL/d scale is the loss's own (direct) gradient.
        return p["scale"] * jnp.sum(emb * target)

    _, grads = jax.jit(gradcache.value_and_grad(encode, loss, chunk_size=chunk))(params, x)
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.bfloat16)}

    x64, t64 = np.asarray(x, np.float64), np.asarray(target, np.float64)
    per_chunk = np.stack([x64[i : i + chunk].T @ t64[i : i + chunk] for i in range(0, b, chunk)])
    # The premises: every chunk's gradient is exact in bfloat16 (at most 12 rows of 3 x 3),
    # and the sums outgrow bfloat16's integers (a bfloat16 accumulator has to round).
    np.testing.assert_array_equal(per_chunk.astype(jnp.bfloat16).astype(np.float64), per_chunk)
    assert per_chunk.sum(0).min() > 256
    ref = {
        "w": per_chunk.sum(0),
        "scale": np.sum((x64 @ np.asarray(params["w"], np.float64)) * t64),
    }
    assert bf16_ulps(grads, ref) <= 1


# --- memory: compile only, nothing allocated --------------------------------------------

_WIDTH, _D_IN, _D_OUT = 1024, 32, 32


def _wide_encode(p, chunk, key):
    """An encoder whose activations (B x 1024, several of them) dwarf its embeddings (B x 32)."""
    outs = []
    for v in chunk:
        h = jax.nn.gelu(v @ p["w1"])  # (c, 32) · (32, 1024) -> (c, 1024)
        h = jax.nn.gelu(h @ p["w2"])  # (c, 1024) · (1024, 1024) -> (c, 1024)
        z = h @ p["w3"]  # (c, 1024) · (1024, 32) -> (c, 32)
        outs.append(z / jnp.linalg.norm(z, axis=-1, keepdims=True))
    return tuple(outs)


def _tiled_loss(p, emb):
    # The tiled loss keeps the loss itself O(B): the comparison is about the encoder.
    return losses.infonce(emb[0], emb[1], temperature=jnp.exp(p["log_t"]), block_size=1024)


def _temp_bytes(f, batch_size):
    params = {
        "w1": jax.ShapeDtypeStruct((_D_IN, _WIDTH), jnp.float32),
        "w2": jax.ShapeDtypeStruct((_WIDTH, _WIDTH), jnp.float32),
        "w3": jax.ShapeDtypeStruct((_WIDTH, _D_OUT), jnp.float32),
        "log_t": jax.ShapeDtypeStruct((), jnp.float32),
    }
    batch = (jax.ShapeDtypeStruct((batch_size, _D_IN), jnp.float32),) * 2
    return jax.jit(f).lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_cached_step_memory_depends_on_chunk_not_batch():
    chunk, big, small = 1024, 65_536, 16_384
    plain = jax.value_and_grad(lambda p, b: _tiled_loss(p, _wide_encode(p, b, None)))
    cached = gradcache.value_and_grad(_wide_encode, _tiled_loss, chunk_size=chunk)

    plain_big, cached_big = _temp_bytes(plain, big), _temp_bytes(cached, big)
    cached_small = _temp_bytes(cached, small)
    print(
        f"temp MiB at B={big}: plain {plain_big / 2**20:.1f}, cached {cached_big / 2**20:.1f} "
        f"(B={small}: {cached_small / 2**20:.1f})"
    )
    assert cached_big <= plain_big / 4
    # Growth from B=16k to 64k is only through [B, D] arrays: embeddings of both views,
    # their gradients and the loss's O(B) vectors; allow 4 such pairs, no activations.
    emb_pair_bytes = 2 * (big - small) * _D_OUT * 4
    assert cached_big - cached_small <= 4 * emb_pair_bytes
    # ... while one activation of the plain step alone is B x 1024 floats.
    assert plain_big >= big * _WIDTH * 4


def _tower_encode(scale):
    """One tower of a two-tower toy model: [c, d_in] -> unit [c, d_out], dropout with a key."""

    def encode(p, chunk, key):
        h = jnp.tanh(scale * chunk @ p["w1"])  # (c, d_in) · (d_in, hidden) -> (c, hidden)
        if key is not None:
            h = jnp.where(jax.random.bernoulli(key, 0.7, h.shape), h / 0.7, 0.0)
        z = h @ p["w2"]  # (c, hidden) · (hidden, d_out) -> (c, d_out)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    return encode


@pytest.mark.parametrize("dropout", [False, True])
def test_towers_of_different_batch_sizes(dropout):
    """B = 10 images, M = 26 captions (extra negatives), chunks of 4 (ragged in both towers):
    the cached gradients equal plain autodiff through the same chunks and keys."""
    params = _toy_params(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    batch = (jax.random.normal(kx, (10, 5)), jax.random.normal(ky, (26, 5)))
    towers = (_tower_encode(1.0), _tower_encode(0.5))
    key = jax.random.key(2) if dropout else None

    def loss(p, emb):
        return losses.reference.infonce(emb[0], emb[1], temperature=jnp.exp(p["log_t"]))

    cached = gradcache.towers_value_and_grad(towers, loss, chunk_size=4)

    def plain(p):
        return loss(p, gradcache.encode_towers_in_chunks(towers, p, batch, key, chunk_size=4))

    (value, grads), (ref_value, ref_grads) = jax.jit(
        lambda p: (cached(p, batch, key), jax.value_and_grad(plain)(p))
    )(params)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL_VALUE)
    assert_close(grads, ref_grads, rtol=RTOL_GRAD)
    with pytest.raises(ValueError, match="2 towers need a batch of 2 parts"):
        cached(params, batch[:1], key)
