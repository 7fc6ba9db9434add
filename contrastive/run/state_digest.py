"""Digests of a PyTree of arrays that do not depend on sharding, device or process count.

:func:`state_digest` is what a checkpoint stores beside the state and compares after every
restore (:mod:`contrastive.run.checkpoint`); ``meta_digest`` does the same for its JSON meta.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "state_digest",
    "meta_digest",
    "digests_and_nonfinite",
    "is_key",
    "keys_to_data",
]


def is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    # Typed PRNG keys are not plain arrays; store their uint32 data and rewrap on restore.
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


# --- digests -------------------------------------------------------------------------------
#
# Each leaf x with n elements is read as 32-bit words w_i (its bits; 8/16-bit elements are
# zero-extended, 64-bit ones folded), i = the flat row-major position. For two seeds s,
#     h_s(x) = sum_i fmix(w_i + fmix(i ^ s))   (mod 2^32),
# fmix being MurmurHash3's 32-bit finaliser (a bijection of uint32). Changing any element
# changes its term, and moving a value to another position changes two terms, so a corruption
# goes unnoticed only when the changed terms cancel in both sums: about 2^-64 for a random
# change. Addition mod 2^32 is associative and commutative, so the sum is exact in any order:
# the digest of a global array does not depend on its sharding, on the device count or on
# which process computes it (every process of a multi-host run gets the same numbers, from
# one jitted reduction over the global array).

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32, one word per element (same shape as ``x``)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        parts = jnp.stack([jnp.real(x), jnp.imag(x)])
        w = _words(parts)
        return w[0] ^ _fmix(w[1] + jnp.uint32(_SEEDS[0]))
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 64:
        pair = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
        return pair[..., 0] ^ _fmix(pair[..., 1] + jnp.uint32(_SEEDS[1]))
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[2]: the two sums h_s(x) above."""
    w = _words(x)
    pos = jnp.zeros(x.shape, jnp.uint32)  # flat row-major index, built without a reshape
    stride = 1
    for d in reversed(range(x.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
        pos = pos + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= x.shape[d]
    return jnp.stack(
        [jnp.sum(_fmix(w + _fmix(pos ^ jnp.uint32(s))), dtype=jnp.uint32) for s in _SEEDS]
    )


def _leaf_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.array(True)


def _digest_and_finite(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    digests = jnp.stack([_leaf_digest(x) for x in leaves])  # (n_leaves, 2)
    finite = jnp.stack([_leaf_finite(x) for x in leaves])  # (n_leaves,)
    return digests, finite


def _device_group(x: Any) -> tuple:
    # One jitted call per set of devices: leaves committed to different devices cannot meet
    # in one computation. Host arrays and uncommitted ones go wherever jax puts them.
    if isinstance(x, jax.Array) and x.committed:
        return tuple(sorted(d.id for d in x.sharding.device_set))
    return ()


def _replicated_out(leaves: list[Any]) -> Any:
    # Replicated outputs can be read on every process (addressable_data(0)), also multi-host.
    for x in leaves:
        s = getattr(x, "sharding", None)
        if isinstance(x, jax.Array) and x.committed and isinstance(s, NamedSharding):
            r = NamedSharding(s.mesh, PartitionSpec())
            return (r, r)
    return None


def digests_and_nonfinite(tree: Any) -> tuple[dict[str, str], list[str]]:
    """``({leaf path: digest}, [paths of non-finite leaves])`` of the stored form of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(keys_to_data(tree))
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    digests: dict[str, str] = {}
    bad: list[str] = []
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(_device_group(x), []).append(i)
    for idx in groups.values():
        part = [leaves[i] for i in idx]
        fn = jax.jit(_digest_and_finite, out_shardings=_replicated_out(part))
        d, f = fn(part)
        d = np.asarray(d.addressable_data(0))
        f = np.asarray(f.addressable_data(0))
        for k, i in enumerate(idx):
            x = leaves[i]
            digests[paths[i]] = f"{x.dtype}{list(x.shape)}:{int(d[k, 0]):08x}{int(d[k, 1]):08x}"
            if not f[k]:
                bad.append(paths[i])
    return digests, bad


def state_digest(tree: Any) -> dict[str, str]:
    """Digest of every leaf of ``tree``: ``{leaf path: "dtype[shape]:16 hex digits"}``.

    Computed on device by one jitted reduction per device set (see the comment above
    ``_fmix`` for the math); equal for equal bits whatever the sharding, on every process.
    PRNG keys are digested through their key data.

    >>> d = state_digest({"w": jnp.zeros((2, 3))})
    >>> list(d), d["['w']"].split(":")[0]
    (["['w']"], 'float32[2, 3]')
    """
    return digests_and_nonfinite(tree)[0]


def meta_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


# --- PRNG keys -----------------------------------------------------------------------------


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings where known) describing the stored form of ``tree``."""

    def one(x: Any) -> Any:
        if is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)

    return jax.tree_util.tree_map(one, tree)


def rewrap_keys(restored: Any, template: Any) -> Any:
    def one(r: Any, t: Any) -> Any:
        if is_key(t):
            key = jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
            sharding = getattr(t, "sharding", None)
            return jax.device_put(key, sharding) if sharding is not None else key
        return r

    return jax.tree_util.tree_map(one, restored, template)
