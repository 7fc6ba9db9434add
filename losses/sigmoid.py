"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._axes import AxisName
from losses._common import anchor_count, global_sum, prepare
from losses._ring import anchor_losses
from losses._tiles import TileRule
from losses._validate import checked_scalar


def sigmoid(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    bias: float | jax.Array = -10.0,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
    block_size: int | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, arXiv 2303.15343), tiled.

    ``L = −(1/B) Σ_{i<B} Σ_{j<M} log σ(z_ij (s_ij + b))`` with ``s_ij = x_i · y_j / τ``,
    ``z_ii = 1`` and ``z_ij = −1`` for ``i ≠ j``: every pair is an independent binary problem, so no
    normalisation over the batch is needed. Computed as ``softplus(−z (s + b))`` tile by
    tile, never as ``log(sigmoid(.))``. SigLIP learns ``t = 1/τ`` and ``b`` (initialised
    at ``τ = 0.1``, ``b = −10``); both arguments accept scalar arrays and are
    differentiable.

    Retrieval batches: ``y`` ``(M, D)`` adds ``M − B`` extra negatives (``z = −1``) for
    every anchor; ``valid`` drops pairs and extra negatives, and the sum is divided by the
    number ``V`` of valid pairs instead of ``B`` (0 when there is none); a candidate
    ``j ≠ i`` with ``ids[j] == ids[i]`` is dropped from the sum (not counted as a positive).

    Args:
      x, y: ``(B, D)`` and ``(M, D)`` embeddings, as in :func:`losses.infonce`.
      temperature: ``τ``, float or scalar array; a traced value must be finite and > 0
        (checked under ``checkify``).
      bias: ``b``, a finite float or scalar array (a traced value is checked for
        finiteness under ``checkify``).
      valid, ids: as in :func:`losses.infonce`.
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
    p = prepare(
        x,
        y,
        "sigmoid",
        min_batch=1,
        block_size=block_size,
        axis_name=axis_name,
        valid=valid,
        ids=ids,
        scalars={"temperature": (temperature, True), "bias": (bias, False)},
    )
    rows, _ = anchor_losses(
        p.x,
        p.y,
        scale=1.0 / checked_scalar("sigmoid", "temperature", temperature, positive=True),
        bias=checked_scalar("sigmoid", "bias", bias, positive=False),
        weights=None,
        valid=p.valid,
        ids=p.ids,
        rule=TileRule("softplus"),
        axis_name=axis_name,
        row_tiling=p.row_tiling,
        col_tiling=p.col_tiling,
    )
    return global_sum(jnp.sum(rows) / anchor_count(p, axis_name), axis_name)
