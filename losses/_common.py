"""What every loss does before and after the engine: checks, the global batch, the psum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from losses._ring import AxisName, axis_size
from losses._tiles import Tiling, choose_tiling
from losses._validate import check_pair


def prepare(
    x: jax.Array,
    y: jax.Array,
    loss: str,
    *,
    min_batch: int,
    block_size: int | None,
    axis_name: AxisName,
    temperature=None,
    sigma=None,
) -> tuple[int, Tiling]:
    """Validate the inputs; return the global batch size and the tiling of the local rows."""
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{loss}: block_size must be a positive int or None, got {block_size!r}.")
    try:
        n = axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"{loss}: axis_name={axis_name!r} is not a mesh axis bound here. Call the loss "
            "inside jax.shard_map over a mesh with that axis (or use losses.sharded), or "
            "pass axis_name=None for a batch held whole."
        ) from e
    check_pair(x, y, loss, min_batch=1, temperature=temperature, sigma=sigma)
    global_batch = x.shape[0] * n
    if global_batch < min_batch:
        where = f" ({n} shards of {x.shape[0]})" if n > 1 else ""
        raise ValueError(
            f"{loss}: needs a global batch of at least {min_batch} pairs, got "
            f"{global_batch}{where}: x has shape {x.shape}."
        )
    return global_batch, choose_tiling(x.shape[0], block_size)


def global_sum(partial: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sum a per-device partial loss over the ring (outside the custom VJP, on purpose)."""
    return partial if axis_name is None else lax.psum(partial, axis_name)


def inverse_temperature(temperature) -> jax.Array:
    return 1.0 / jnp.asarray(temperature, jnp.float32).reshape(())
