"""InfoNCE (CLIP) and NT-Xent (SimCLR): the softmax contrastive losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from losses._common import global_sum, inverse_temperature, prepare
from losses._ring import AxisName, anchor_losses
from losses._tiles import TileRule


def softmax_contrastive(
    x: jax.Array,
    y: jax.Array,
    *,
    loss: str,
    temperature,
    symmetric: bool,
    intra_view: bool,
    drop_positive: bool,
    sigma: float | None,
    block_size: int | None,
    axis_name: AxisName,
) -> jax.Array:
    """The family behind ``infonce`` and ``decoupled``: mean of per-anchor softmax losses."""
    global_batch, tiling = prepare(
        x,
        y,
        loss,
        min_batch=2 if drop_positive else 1,
        block_size=block_size,
        axis_name=axis_name,
        temperature=temperature,
        sigma=sigma,
    )
    weights = None if sigma is None else dclw_weights(x, y, sigma, axis_name, global_batch)
    rule = TileRule(
        "logsumexp", columns=symmetric, drop_positive=drop_positive, intra_view=intra_view
    )
    rows, cols = anchor_losses(
        x,
        y,
        scale=inverse_temperature(temperature),
        bias=jnp.zeros((), jnp.float32),
        weights=weights,
        rule=rule,
        axis_name=axis_name,
        tiling=tiling,
    )
    partial = jnp.sum(rows) if cols is None else 0.5 * (jnp.sum(rows) + jnp.sum(cols))
    return global_sum(partial / global_batch, axis_name)


def dclw_weights(
    x: jax.Array, y: jax.Array, sigma: float, axis_name: AxisName, global_batch: int
) -> jax.Array:
    """DCLW weights ``w_i = 2 - B softmax_i(x_i . y_i / sigma)`` of the local pairs.

    The softmax runs over the global batch (a max and a sum across the ring, O(1) data)
    and carries no gradient, as in Yeh et al. (2022).
    """
    pos = jnp.einsum("bd,bd->b", x, y, preferred_element_type=jnp.float32) / sigma
    pos = lax.stop_gradient(pos)
    m = jnp.max(pos)
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    e = jnp.exp(pos - m)
    total = global_sum(jnp.sum(e), axis_name)
    return 2.0 - global_batch * e / total


def infonce(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    symmetric: bool = True,
    intra_view: bool = False,
    block_size: int | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""InfoNCE / CLIP contrastive loss, tiled; NT-Xent with ``intra_view=True``.

    With logits ``s_ij = x_i · y_j / τ`` over the global batch of ``B`` pairs, the x→y
    loss of anchor ``i`` is ``ℓ_i = logsumexp_j s_ij − s_ii`` and the y→x loss of anchor
    ``j`` is ``ℓ'_j = logsumexp_i s_ij − s_jj``. ``symmetric=True`` returns
    ``½ (mean ℓ + mean ℓ')`` (CLIP, Radford et al. 2021); ``False`` returns ``mean ℓ``
    (van den Oord et al. 2018). ``intra_view=True`` adds same-view negatives to every
    denominator, ``x_i · x_k / τ`` and ``y_j · y_k / τ`` for ``k ≠`` the anchor: SimCLR's
    NT-Xent (Chen et al. 2020, arXiv 2002.05709), averaged over all ``2B`` anchors when
    symmetric.

    The ``B × B`` matrix never exists: tiles of ``block_size`` rows are folded into running
    log-sum-exps and recomputed in the backward pass (Inf-CL, Cheng et al. 2024, arXiv
    2410.17243). Memory beyond inputs and outputs is ``O(B)`` plus a few tiles.

    Args:
      x, y: ``(B, D)`` embeddings (float32 or bfloat16), row ``i`` of ``x`` pairs with row
        ``i`` of ``y``; used as given (normalise them in the model). Inside
        ``jax.shard_map`` with ``axis_name``, the local ``(B / n, D)`` shards.
      temperature: ``τ > 0``, a float or a scalar array (differentiable).
      symmetric: average both directions (CLIP) or use x→y only.
      intra_view: add same-view negatives (NT-Xent).
      block_size: tile edge; ``None`` picks one. Any value gives the same result.
      axis_name: mesh axis (or tuple of axes) the batch is sharded over, inside
        ``shard_map``; ``None`` when ``x``, ``y`` are the whole batch.

    Returns:
      The scalar float32 loss over the global batch (the same on every device).

    Example:
      >>> import jax, losses
      >>> x = jax.random.normal(jax.random.key(0), (512, 64))
      >>> y = x + 0.1 * jax.random.normal(jax.random.key(1), (512, 64))
      >>> loss, (dx, dy) = jax.value_and_grad(losses.infonce, argnums=(0, 1))(x, y)
      >>> bool(jax.numpy.isfinite(loss))
      True
    """
    return softmax_contrastive(
        x,
        y,
        loss="infonce",
        temperature=temperature,
        symmetric=symmetric,
        intra_view=intra_view,
        drop_positive=False,
        sigma=None,
        block_size=block_size,
        axis_name=axis_name,
    )
