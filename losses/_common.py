"""What every loss does before and after the engine: checks, the global batch, the psum."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from losses._axes import AxisName, axis_size
from losses._tiles import Tiling, choose_tiling
from losses._validate import check_block_size, check_masks, check_pair, check_scalar


class Prepared(NamedTuple):
    """Checked inputs of a loss, as JAX arrays, and how the engine cuts them."""

    x: jax.Array  # (b, D), the local anchors
    y: jax.Array  # (m, D), the local positives then extra negatives
    valid: jax.Array | None  # (m,) bool
    ids: jax.Array | None  # (m,) integer
    global_batch: int  # B (pairs) over all devices
    row_tiling: Tiling  # of the b rows of x
    col_tiling: Tiling  # of the m rows of y


def prepare(
    x,
    y,
    loss: str,
    *,
    min_batch: int,
    block_size,
    axis_name: AxisName,
    valid=None,
    ids=None,
    intra_view: bool = False,
    scalars: dict | None = None,
) -> Prepared:
    """Validate the inputs (one-line errors, before any work) and turn them into arrays.

    ``scalars``: ``{name: (value, positive)}`` of the hyperparameters to check.
    """
    block_size = check_block_size(loss, block_size)
    try:
        n = axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"{loss}: axis_name={axis_name!r} is not a mesh axis bound here. Call the loss "
            "inside jax.shard_map over a mesh with that axis (or use losses.sharded), or "
            "pass axis_name=None for a batch held whole."
        ) from e
    check_pair(x, y, loss, min_batch=1, intra_view=intra_view)
    # NumPy inputs and nested lists become arrays here: the sweeps index them with traced
    # tile numbers.
    x, y = jnp.asarray(x), jnp.asarray(y)
    for name, (value, positive) in (scalars or {}).items():
        check_scalar(loss, name, value, positive=positive)
    b, m = jnp.shape(x)[0], jnp.shape(y)[0]
    check_masks(loss, valid, ids, m)
    global_rows = m * n
    if global_rows < min_batch:
        where = f" ({n} shards of {m})" if n > 1 else ""
        raise ValueError(
            f"{loss}: needs a global batch of at least {min_batch} pairs, got "
            f"{global_rows}{where}: y has shape {jnp.shape(y)}."
        )
    valid = None if valid is None else jnp.asarray(valid)
    ids = None if ids is None else jnp.asarray(ids)
    row_tiling = choose_tiling(b, block_size)
    col_tiling = row_tiling if m == b else choose_tiling(m, block_size)
    return Prepared(x, y, valid, ids, b * n, row_tiling, col_tiling)


def global_sum(partial: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sum a per-device partial loss over the ring (outside the custom VJP, on purpose)."""
    return partial if axis_name is None else lax.psum(partial, axis_name)


def anchor_count(p: Prepared, axis_name: AxisName) -> jax.Array | int:
    """The number of valid pairs over all devices (at least 1, so that an all-invalid
    batch gives 0, not 0/0): a traced count with ``valid``, else the static batch."""
    if p.valid is None:
        return p.global_batch
    b = p.x.shape[0]
    count = global_sum(jnp.sum(p.valid[:b], dtype=jnp.int32), axis_name)
    return jnp.maximum(count, 1).astype(jnp.float32)
