"""The softmax family behind ``infonce`` and ``decoupled``, and DCLW's weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from losses._axes import AxisName
from losses._common import anchor_count, global_sum, prepare
from losses._ring import anchor_losses
from losses._tiles import TileRule
from losses._validate import checked_scalar


def softmax_contrastive(
    x: jax.Array,
    y: jax.Array,
    *,
    loss: str,
    temperature,
    symmetric: bool,
    intra_view: bool,
    drop_positive: bool,
    sigma,
    valid: jax.Array | None,
    ids: jax.Array | None,
    block_size: int | None,
    axis_name: AxisName,
) -> jax.Array:
    """Mean over valid anchors of per-anchor softmax losses (InfoNCE, DCL, DCLW)."""
    scalars = {"temperature": (temperature, True)}
    if sigma is not None:
        scalars["sigma"] = (sigma, True)
    p = prepare(
        x,
        y,
        loss,
        min_batch=2 if drop_positive else 1,
        block_size=block_size,
        axis_name=axis_name,
        valid=valid,
        ids=ids,
        intra_view=intra_view,
        scalars=scalars,
    )
    scale = 1.0 / checked_scalar(loss, "temperature", temperature, positive=True)
    count = anchor_count(p, axis_name)
    weights = None
    if sigma is not None:
        sigma = checked_scalar(loss, "sigma", sigma, positive=True)
        weights = dclw_weights(p.x, p.y, sigma, axis_name, count, p.valid)
    rule = TileRule(
        "logsumexp", columns=symmetric, drop_positive=drop_positive, intra_view=intra_view
    )
    rows, cols = anchor_losses(
        p.x,
        p.y,
        scale=scale,
        bias=jnp.zeros((), jnp.float32),
        weights=weights,
        valid=p.valid,
        ids=p.ids,
        rule=rule,
        axis_name=axis_name,
        row_tiling=p.row_tiling,
        col_tiling=p.col_tiling,
    )
    partial = jnp.sum(rows) if cols is None else 0.5 * (jnp.sum(rows) + jnp.sum(cols))
    return global_sum(partial / count, axis_name)


def dclw_weights(
    x: jax.Array,
    y: jax.Array,
    sigma: jax.Array,
    axis_name: AxisName,
    count: jax.Array | int,
    valid: jax.Array | None = None,
) -> jax.Array:
    """DCLW weights ``w_i = 2 - V softmax_i(x_i · y_i / σ)`` of the local pairs, ``(b,)``.

    The softmax runs over the valid pairs of the global batch (a max and a sum across the
    ring, O(1) data), ``V`` is their number (``count``), and it carries no gradient, as in
    Yeh et al. (2022). Invalid pairs get weight 0.
    """
    b = x.shape[0]
    # (b, D) · (b, D) row by row -> (b,): the positives' products.
    pos = jnp.einsum("bd,bd->b", x, y[:b], preferred_element_type=jnp.float32) / sigma
    pos = lax.stop_gradient(pos)
    if valid is not None:
        pos = jnp.where(valid[:b], pos, -jnp.inf)
    m = jnp.max(pos)
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # no valid pair anywhere
    e = jnp.exp(pos - m)
    total = global_sum(jnp.sum(e), axis_name)
    w = 2.0 - count * e / jnp.where(total > 0, total, 1.0)
    return w if valid is None else jnp.where(valid[:b], w, 0.0)
