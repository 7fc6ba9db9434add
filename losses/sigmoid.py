"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._common import global_sum, inverse_temperature, prepare
from losses._ring import AxisName, anchor_losses
from losses._tiles import TileRule


def sigmoid(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    bias: float | jax.Array = -10.0,
    block_size: int | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, arXiv 2303.15343), tiled.

    ``L = −(1/B) Σ_i Σ_j log σ(z_ij (s_ij + b))`` with ``s_ij = x_i · y_j / τ``, ``z_ii = 1``
    and ``z_ij = −1`` for ``i ≠ j``: every pair is an independent binary problem, so no
    normalisation over the batch is needed. Computed as ``softplus(−z (s + b))`` tile by
    tile, never as ``log(sigmoid(.))``. SigLIP learns ``t = 1/τ`` and ``b`` (initialised
    at ``τ = 0.1``, ``b = −10``); both arguments accept scalar arrays and are
    differentiable.

    Args:
      x, y: ``(B, D)`` embeddings, as in :func:`losses.infonce`.
      temperature: ``τ > 0``, float or scalar array.
      bias: ``b``, float or scalar array.
      block_size, axis_name: as in :func:`losses.infonce`. Across devices this is the
        ring form of SigLIP's chunked loss: ``y`` blocks travel, nothing is gathered.

    Returns:
      The scalar float32 loss over the global batch.

    Example:
      >>> import jax, losses
      >>> x = jax.random.normal(jax.random.key(0), (256, 32))
      >>> loss, grads = jax.value_and_grad(losses.sigmoid, argnums=(0, 1))(x, x)
      >>> grads[0].shape
      (256, 32)
    """
    global_batch, tiling = prepare(
        x,
        y,
        "sigmoid",
        min_batch=1,
        block_size=block_size,
        axis_name=axis_name,
        temperature=temperature,
    )
    rows, _ = anchor_losses(
        x,
        y,
        scale=inverse_temperature(temperature),
        bias=jnp.asarray(bias, jnp.float32),
        weights=None,
        rule=TileRule("softplus"),
        axis_name=axis_name,
        tiling=tiling,
    )
    return global_sum(jnp.sum(rows) / global_batch, axis_name)
