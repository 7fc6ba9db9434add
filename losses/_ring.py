"""The ring: per-anchor losses over a batch sharded across devices, with a custom VJP.

``anchor_losses`` is the one engine behind every loss. Each of ``n`` devices keeps its
``b`` rows of ``x`` and ``y``; the ``y`` block (and, for intra-view negatives, the ``x``
block) travels around the ring with ``lax.ppermute``, ``n`` steps, meeting the local block
in a tile sweep (``_tiles.py``) at each step. Column statistics of the visiting block
travel with it and arrive home complete; in the backward pass its gradient accumulator
travels the same way. No device ever holds more than its own block, one visiting block,
the one being received and a few tiles. With ``axis_name=None`` the ring has one device
and no communication: that is the single-device tiled loss.

The engine returns per-anchor losses, local to the device:

* ``logsumexp``: ``rows_i`` the loss of x anchor ``i`` (``lse_i - s_ii``, or for DCL
  ``lse_{j≠i} - w_i s_ii``) and ``cols_j`` that of y anchor ``j``, each log-sum-exp over
  the global batch.
* ``softplus``: ``rows_i = sum_j softplus(-z_ij (s_ij + b))``.

The loss functions reduce these with a ``psum`` *outside* the custom VJP, so that JAX's own
rules for ``psum`` decide the cotangents with and without ``check_vma``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from losses._tiles import (
    F32,
    TileRule,
    Tiling,
    combine_lse,
    empty_lse,
    lse_value,
    sweep_backward,
    sweep_forward,
)

AxisName = str | tuple[str, ...] | None


# ------------------------------------------------------------------ ring communication


def axis_size(axis_name: AxisName) -> int:
    if axis_name is None:
        return 1
    return int(lax.psum(1, axis_name))


def _shift(tree, axis_name: AxisName, n: int):
    """Send every leaf one step along the ring: device k receives from device k - 1."""
    if n == 1:
        return tree
    perm = [(k, (k + 1) % n) for k in range(n)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


def _varying_axes(a) -> frozenset:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def match_varying(a: jax.Array, like: jax.Array) -> jax.Array:
    """Mark ``a`` as varying over the mesh axes ``like`` varies over (under check_vma).

    Loop carries and the scalar hyperparameters must have the same varying-axes type as
    the sharded embeddings; without check_vma every set is empty and this is a no-op.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(a)))
    return lax.pcast(a, missing, to="varying") if missing else a


def ring(step, visiting, travelling, local, *, axis_name: AxisName, n: int):
    """Run ``step`` on each of the ``n`` blocks that visit this device, in ring order.

    ``step(visiting, travelling, local, first) -> (travelling, local)``: ``visiting`` is
    read-only data of the visiting block, ``travelling`` its accumulators (they move on
    with it after the step), ``local`` this device's accumulators. ``first`` (static) is
    True for the step that pairs the device's block with itself. The next visiting block
    is sent before the current one is used, so that communication overlaps the sweep.
    Afterwards the travelling accumulators are back on their home device.
    """
    if n == 1:
        travelling, local = step(visiting, travelling, local, True)
        return travelling, local
    incoming = _shift(visiting, axis_name, n)
    travelling, local = step(visiting, travelling, local, True)
    travelling = _shift(travelling, axis_name, n)

    def middle(_, carry):
        visiting, travelling, local = carry
        incoming = _shift(visiting, axis_name, n)
        travelling, local = step(visiting, travelling, local, False)
        return incoming, _shift(travelling, axis_name, n), local

    visiting, travelling, local = lax.fori_loop(0, n - 2, middle, (incoming, travelling, local))
    travelling, local = step(visiting, travelling, local, False)
    return _shift(travelling, axis_name, n), local


# ---------------------------------------------------------------------------- the engine


def _pad(a: jax.Array, tiling: Tiling, value=0.0) -> jax.Array:
    if not tiling.ragged:
        return a
    widths = [(0, tiling.padded - tiling.size)] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, widths, constant_values=value)


def _positive_products(x, y):
    # Row-wise dot products x_i · y_i, float32: the positive pairs' unscaled logits, (b,).
    return jnp.einsum("bd,bd->b", x, y, preferred_element_type=F32)


def _forward(x, y, scale, bias, weights, rule: TileRule, axis_name, tiling: Tiling):
    """Per-anchor losses and the log-sum-exp vectors the backward pass needs."""
    n = axis_size(axis_name)
    xp, yp = _pad(x, tiling), _pad(y, tiling)
    P = tiling.padded
    softmax = rule.kind == "logsumexp"
    init = match_varying(empty_lse(P) if softmax else jnp.zeros((P,), F32), x)
    sweep = functools.partial(sweep_forward, tiling=tiling, kind=rule.kind)

    visiting = (yp, xp) if rule.intra_view else (yp,)
    travelling = init if (softmax and rule.columns) else None
    y_intra = init if (rule.intra_view and rule.columns) else None
    local = (init, y_intra)

    def step(visiting, col_acc, local, first):
        row_acc, y_acc = local
        y_vis = visiting[0]
        # Cross-view tile: local x anchors against the visiting y block.
        # The positive is left out here (its logit enters the loss separately).
        row_acc, col_acc = sweep(
            xp, y_vis, scale, bias, row_acc, col_acc, diagonal=first, drop_diagonal=softmax
        )
        if rule.intra_view:
            x_vis = visiting[1]
            # Same-view negatives: local x against visiting x, local y against visiting y.
            row_acc, _ = sweep(
                xp, x_vis, scale, bias, row_acc, None, diagonal=first, drop_diagonal=True
            )
            if y_acc is not None:
                y_acc, _ = sweep(
                    yp, y_vis, scale, bias, y_acc, None, diagonal=first, drop_diagonal=True
                )
        return col_acc, (row_acc, y_acc)

    col_acc, (row_acc, y_acc) = ring(step, visiting, travelling, local, axis_name=axis_name, n=n)
    b = tiling.size
    if not softmax:
        return row_acc[:b], None, (None, None)
    pos = _positive_products(x, y)
    rows, row_res = _softmax_anchor_losses(row_acc[:b], pos, scale, weights, rule)
    if not rule.columns:
        return rows, None, (row_res, None)
    neg_c = col_acc[:b] if y_acc is None else combine_lse(col_acc[:b], y_acc[:b], scale)
    cols, col_res = _softmax_anchor_losses(neg_c, pos, scale, weights, rule)
    return rows, cols, (row_res, col_res)


def _softmax_anchor_losses(neg_lse, pos, scale, weights, rule: TileRule):
    """Per-anchor loss from the log-sum-exp over negatives (``(m, S)`` pairs, see
    ``_tiles``) and the positive's unscaled product ``pos``.

    Returns the loss and what the backward pass needs, ``(lse_neg, a, c)``: a negative's
    ``dℓ/ds = a · exp(s - lse_neg)`` and the positive's ``dℓ/ds_pos = -c``.

    InfoNCE: ``ℓ = logaddexp(s_pos, lse_neg) - s_pos = softplus(m)`` with
    ``m = lse_neg - s_pos``, and ``a = c = 1 - p_pos = sigmoid(m)``. Written this way
    (rather than ``lse - s_pos`` and ``p_pos - 1``) the loss and its gradient keep their
    digits when the positive dominates, where the naive forms cancel to nothing; and a
    row of ``G`` sums to zero up to rounding of ``a`` alone, which keeps ``dL/dτ``
    accurate at large logits.
    DCL: ``ℓ = lse_neg - w s_pos``, ``a = 1``, ``c = w``.
    """
    if rule.drop_positive:
        w = jnp.ones_like(pos) if weights is None else weights
        return lse_value(neg_lse, scale) - w * scale * pos, (neg_lse, jnp.ones_like(pos), w)
    # m - pos is exact when they are close: the margin keeps its digits at any scale.
    margin = scale * (neg_lse[:, 0] - pos) + jnp.log(neg_lse[:, 1])
    c = jax.nn.sigmoid(margin)
    return jax.nn.softplus(margin), (neg_lse, c, c)


def _backward(res, cotangents, rule: TileRule, axis_name, tiling: Tiling):
    x, y, scale, bias, weights, (row_res, col_res) = res
    g_r, g_c = cotangents
    n = axis_size(axis_name)
    softmax = rule.kind == "logsumexp"
    P = tiling.padded
    xp, yp = _pad(x, tiling), _pad(y, tiling)
    g_r = _pad(g_r.astype(F32), tiling)
    sweep = functools.partial(sweep_backward, tiling=tiling, kind=rule.kind)

    zeros = match_varying(jnp.zeros((P, x.shape[1]), F32), x)
    d_hyper = match_varying(jnp.zeros((2,), F32), x)  # (d scale, d bias)
    if softmax:
        # Per anchor: (lse_neg, g a, g c), see _softmax_anchor_losses. Padded anchors get
        # lse = (+inf, 1) and g = 0, so their terms are exactly zero.
        def stats(res, g):
            lse, a, c = res
            lse = _pad(lse, tiling, jnp.inf).at[tiling.size :, 1].set(1.0)
            return (lse, _pad(a, tiling) * g, _pad(c, tiling) * g)

        row_stats = stats(row_res, g_r)
        col_stats = stats(col_res, _pad(g_c.astype(F32), tiling)) if rule.columns else None
    else:
        row_stats, col_stats = (g_r,), None

    # The visiting block carries its data and statistics; its dy accumulator travels too.
    visiting = (yp, col_stats) + ((xp, row_stats) if rule.intra_view else (None, None))

    def step(visiting, d_y_vis, local, first):
        d_x, d_hyper = local
        y_vis, col_vis, x_vis, row_vis = visiting
        # Cross-view tile: dx (local) += G · y_vis, dy_vis += Gᵀ · x.
        d_x, d_y_vis, d_hyper = sweep(
            xp,
            y_vis,
            scale,
            bias,
            row_stats,
            col_vis,
            d_x,
            d_y_vis,
            d_hyper,
            diagonal=first,
            drop_diagonal=softmax,
        )
        if rule.intra_view:
            # x·x tile: both anchors' terms, accumulated on the local side only (the
            # visiting side gets its own when this block visits it).
            d_x, _, d_hyper = sweep(
                xp,
                x_vis,
                scale,
                bias,
                row_stats[:2],
                row_vis[:2],
                d_x,
                None,
                d_hyper,
                diagonal=first,
                drop_diagonal=True,
                hyper_weight=0.5,
            )
            if rule.columns:
                # y·y tile with the visiting block as rows, so that its accumulator (which
                # travels anyway) takes the update and no local dy buffer is needed.
                d_y_vis, _, d_hyper = sweep(
                    y_vis,
                    yp,
                    scale,
                    bias,
                    col_vis[:2],
                    col_stats[:2],
                    d_y_vis,
                    None,
                    d_hyper,
                    diagonal=first,
                    drop_diagonal=True,
                    hyper_weight=0.5,
                )
        return d_y_vis, (d_x, d_hyper)

    d_y, (d_x, d_hyper) = ring(step, visiting, zeros, (zeros, d_hyper), axis_name=axis_name, n=n)
    b = tiling.size
    d_x, d_y = d_x[:b], d_y[:b]
    # Tile sums of G ∘ (x·yᵀ) and of G; the positives' -c terms sit in the diagonal tiles.
    d_scale, d_bias = d_hyper[0], d_hyper[1]
    d_weights = None if weights is None else jnp.zeros_like(weights)
    return (
        d_x.astype(x.dtype),
        d_y.astype(y.dtype),
        d_scale.astype(jnp.result_type(scale)),
        d_bias.astype(jnp.result_type(bias)),
        d_weights,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _anchor_losses(x, y, scale, bias, weights, rule, axis_name, tiling):
    rows, cols, _ = _forward(x, y, scale, bias, weights, rule, axis_name, tiling)
    return rows, cols


def _anchor_losses_fwd(x, y, scale, bias, weights, rule, axis_name, tiling):
    rows, cols, stats = _forward(x, y, scale, bias, weights, rule, axis_name, tiling)
    return (rows, cols), (x, y, scale, bias, weights, stats)


def _anchor_losses_bwd(rule, axis_name, tiling, res, cotangents):
    return _backward(res, cotangents, rule, axis_name, tiling)


_anchor_losses.defvjp(_anchor_losses_fwd, _anchor_losses_bwd)


def anchor_losses(
    x: jax.Array,
    y: jax.Array,
    *,
    scale: jax.Array,
    bias: jax.Array,
    weights: jax.Array | None,
    rule: TileRule,
    axis_name: AxisName,
    tiling: Tiling,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-anchor losses of the local shard: ``(rows (b,), cols (b,) or None)``, float32.

    ``scale`` (= 1 / temperature) and ``bias`` are float32 scalars; ``weights`` the DCLW
    weights of the local positives (or None for 1). Differentiable in x, y, scale, bias.
    """
    scale = match_varying(jnp.asarray(scale, F32), x)
    bias = match_varying(jnp.asarray(bias, F32), x)
    if weights is not None:
        weights = match_varying(lax.stop_gradient(weights.astype(F32)), x)
    if rule.kind == "logsumexp" and not rule.columns:
        rows, _ = _anchor_losses(x, y, scale, bias, weights, rule, axis_name, tiling)
        return rows, None
    return _anchor_losses(x, y, scale, bias, weights, rule, axis_name, tiling)
