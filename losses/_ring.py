"""The engine: per-anchor losses over a batch sharded across devices, with a custom VJP.

``anchor_losses`` is the one engine behind every loss. Each of ``n`` devices keeps its
``b`` rows of ``x`` and ``m ≥ b`` rows of ``y`` (its ``b`` positives, then its extra
negatives); the ``y`` block (and, for intra-view negatives, the ``x`` block) travels around
the ring with ``lax.ppermute``, ``n`` steps, meeting the local block in a tile sweep
(``_tiles.py``) at each step. Column statistics of the visiting block, and its per-row
masks, travel with it and arrive home complete; in the backward pass its gradient
accumulator travels the same way. No device ever holds more than its own block, one
visiting block, the one being received and a few tiles. With ``axis_name=None`` the ring
has one device and no communication: that is the single-device tiled loss.

The engine returns per-anchor losses, local to the device:

* ``logsumexp``: ``rows_i`` the loss of x anchor ``i`` (``softplus(lse_i - s_ii)``, or for
  DCL ``lse_i - w_i s_ii``, ``lse_i`` over anchor ``i``'s negatives) and ``cols_j`` that of
  y anchor ``j < b``, each log-sum-exp over the global batch. An anchor without a single
  negative (an invalid one, or one whose candidates all share its id) has loss 0.
* ``softplus``: ``rows_i = sum_j softplus(-z_ij (s_ij + b))`` over the pairs that count.

The loss functions reduce these with a ``psum`` *outside* the custom VJP, so that JAX's own
rules for ``psum`` decide the cotangents with and without ``check_vma``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from losses._axes import AxisName, axis_size, match_varying
from losses._tiles import (
    F32,
    AnchorGrads,
    HyperGrads,
    SideMasks,
    TileRule,
    Tiling,
    combine_lse,
    empty_lse,
    sweep_backward,
    sweep_forward,
)

# ------------------------------------------------------------------ ring communication


def _shift(tree, axis_name: AxisName, n: int):
    """Send every leaf one step along the ring: device k receives from device k - 1."""
    if n == 1:
        return tree
    perm = [(k, (k + 1) % n) for k in range(n)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


def ring(step, visiting, travelling, local, *, axis_name: AxisName, n: int):
    """Run ``step`` on each of the ``n`` blocks that visit this device, in ring order.

    ``step(visiting, travelling, local, own_block) -> (travelling, local)``: ``visiting``
    is read-only data of the visiting block, ``travelling`` its accumulators (they move on
    with it after the step), ``local`` this device's accumulators. ``own_block`` (static)
    is True for the step where the device meets its own block (the one that holds the
    positive pairs). The next visiting block is sent before the current one is used, so
    that communication overlaps the sweep. Afterwards the travelling accumulators are back
    on their home device.
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


# ----------------------------------------------------------------------------- helpers


def _pad(a: jax.Array, length: int, value=0) -> jax.Array:
    """``a`` padded with ``value`` along its first axis to ``length`` rows."""
    if a.shape[0] == length:
        return a
    widths = [(0, length - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, widths, constant_values=value)


def _side_masks(valid, ids, size: int, tiling: Tiling) -> SideMasks | None:
    """The first ``size`` rows' masks, padded with ``keep = False`` to whole tiles."""
    if valid is None and ids is None:
        return None
    keep = jnp.ones((size,), bool) if valid is None else valid[:size]
    return SideMasks(
        keep=_pad(keep, tiling.padded, False),
        ids=None if ids is None else _pad(ids[:size], tiling.padded, 0),
    )


def _positive_products(x, y, row_masks: SideMasks | None):
    # Row-wise dot products x_i · y_i, float32: the positive pairs' unscaled logits, (b,).
    pos = jnp.einsum("bd,bd->b", x, y[: x.shape[0]], preferred_element_type=F32)
    if row_masks is not None:  # invalid rows may hold anything, NaN included
        pos = jnp.where(row_masks.keep[: x.shape[0]], pos, 0.0)
    return pos


def _softmax_loss_from_lse(neg_lse, pos, scale, weights, rule: TileRule):
    """Per-anchor loss from the log-sum-exp over negatives (``(m, S)`` pairs, see
    ``_tiles``) and the positive's unscaled product ``pos``.

    Returns the loss and what the backward pass needs, ``(lse_neg, a, c)``: a negative's
    ``dℓ/ds = a · exp(s - lse_neg)`` and the positive's ``dℓ/ds_pos = -c``.

    InfoNCE: ``ℓ = logaddexp(s_pos, lse_neg) - s_pos = softplus(m)`` with
    ``m = lse_neg - s_pos``, and ``a = c = 1 - p_pos = sigmoid(m)``. Written this way
    (rather than ``lse - s_pos`` and ``p_pos - 1``) the loss and its gradient keep their
    digits when the positive dominates, where the naive forms cancel to nothing; and a
    row of ``G`` sums to zero up to rounding of ``a`` alone, which keeps ``dL/dτ``
    accurate at large logits. Without negatives (``S = 0``) ``m = -inf``: ``ℓ = 0``.
    DCL: ``ℓ = lse_neg - w s_pos = scale (m - w pos) + log S``, ``a = 1``, ``c = w``; 0
    (and ``a = c = 0``) without negatives, where ``lse_neg = -inf``.
    """
    # m - pos is exact when they are close: the margin keeps its digits at any scale, where
    # (scale m + log S) - scale pos would subtract two large logits.
    if rule.drop_positive:
        has_neg = neg_lse[:, 1] > 0
        gap = neg_lse[:, 0] - (pos if weights is None else weights * pos)
        loss = jnp.where(has_neg, scale * gap + jnp.log(neg_lse[:, 1]), 0.0)
        a = has_neg.astype(F32)
        return loss, (neg_lse, a, a if weights is None else a * weights)
    margin = scale * (neg_lse[:, 0] - pos) + jnp.log(neg_lse[:, 1])
    c = jax.nn.sigmoid(margin)
    return jax.nn.softplus(margin), (neg_lse, c, c)


def _anchor_grads(res, g, length: int) -> AnchorGrads:
    """Backward statistics of anchors, padded to ``length``. Padded anchors, and anchors
    without negatives (``S = 0``), get ``lse = (+inf, 1)`` and weight 0, so that every term
    they would add to ``G`` is exactly 0 (not 0/0)."""
    lse, a, c = res
    empty = lse[:, 1:2] == 0
    lse = jnp.where(empty, jnp.array([jnp.inf, 1.0], F32), lse)
    lse = _pad(lse, length, 1.0).at[lse.shape[0] :, 0].set(jnp.inf)
    return AnchorGrads(weight=_pad(a * g, length), lse=lse, positive=_pad(c * g, length))


def _anchor_scales(scale, rt: Tiling, ct: Tiling):
    """``(scalar scale, row scales (Pr,) or None, column scales (Pc,) or None)``.

    ``scale`` is a scalar, or a pair ``(row (b,), col (b,) or None)`` of per-anchor scales
    (individual temperatures); padding and extra negatives get scale 1 (no anchors)."""
    if not isinstance(scale, tuple):
        return scale, None, None
    row, col = scale
    one = jnp.ones((), F32)
    row = _pad(row, rt.padded, 1.0)
    col = None if col is None else _pad(col, ct.padded, 1.0)
    return one, row, col


# ---------------------------------------------------------------------------- forward


def _forward(x, y, scale, bias, weights, valid, ids, rule: TileRule, axis_name, tilings):
    """Per-anchor losses and the log-sum-exp vectors the backward pass needs."""
    rt, ct = tilings
    n = axis_size(axis_name)
    b = rt.size
    xp, yp = _pad(x, rt.padded), _pad(y, ct.padded)
    x_masks = _side_masks(valid, ids, b, rt)
    y_masks = _side_masks(valid, ids, ct.size, ct)
    softmax = rule.kind == "logsumexp"
    # Per-anchor scales: the rows' stay here, the columns' travel with their block.
    scale, row_scale, col_scale = _anchor_scales(scale, rt, ct)
    init_r = match_varying(empty_lse(rt.padded) if softmax else jnp.zeros((rt.padded,), F32), x)
    init_c = match_varying(empty_lse(ct.padded), x) if softmax else None
    sweep = functools.partial(sweep_forward, scale=scale, bias=bias, kind=rule.kind)

    # The visiting block: y and its masks; x and its masks for same-view negatives (then
    # m = b, so the x block's tiling and masks are those of y).
    visiting = (yp, y_masks) + ((xp, x_masks) if rule.intra_view else ())
    if row_scale is not None:
        visiting = visiting + (col_scale,)  # (intra_view is excluded)
    travelling = init_c if (softmax and rule.columns) else None
    y_intra = init_c if (rule.intra_view and rule.columns) else None
    local = (init_r, y_intra)

    def step(visiting, col_acc, local, own_block):
        row_acc, y_acc = local
        y_vis, y_vis_masks = visiting[:2]
        # Cross-view tile: local x anchors against the visiting y block. For the softmax
        # losses the positive is left out here (its logit enters the loss separately).
        row_acc, col_acc = sweep(
            xp,
            y_vis,
            row_acc=row_acc,
            col_acc=col_acc,
            row_tiling=rt,
            col_tiling=ct,
            own_block=own_block,
            row_masks=x_masks,
            col_masks=y_vis_masks,
            row_scale=row_scale,
            col_scale=visiting[2] if row_scale is not None else None,
        )
        if rule.intra_view:
            x_vis, x_vis_masks = visiting[2:]
            # Same-view negatives: local x against visiting x, local y against visiting y.
            same_view = dict(row_tiling=rt, col_tiling=rt, own_block=own_block, col_acc=None)
            row_acc, _ = sweep(
                xp, x_vis, row_acc=row_acc, row_masks=x_masks, col_masks=x_vis_masks, **same_view
            )
            if y_acc is not None:
                y_acc, _ = sweep(
                    yp, y_vis, row_acc=y_acc, row_masks=y_masks, col_masks=y_vis_masks, **same_view
                )
        return col_acc, (row_acc, y_acc)

    col_acc, (row_acc, y_acc) = ring(step, visiting, travelling, local, axis_name=axis_name, n=n)
    if not softmax:
        return row_acc[:b], None, (None, None)
    pos = _positive_products(x, y, x_masks)
    s_r = scale if row_scale is None else row_scale[:b]
    rows, row_res = _softmax_loss_from_lse(row_acc[:b], pos, s_r, weights, rule)
    if not rule.columns:
        return rows, None, (row_res, None)
    # y anchors are the positives, the first b rows of the local y block.
    s_c = scale if col_scale is None else col_scale[:b]
    neg_c = col_acc[:b] if y_acc is None else combine_lse(col_acc[:b], y_acc[:b], scale)
    cols, col_res = _softmax_loss_from_lse(neg_c, pos, s_c, weights, rule)
    return rows, cols, (row_res, col_res)


# --------------------------------------------------------------------------- backward


def _backward(res, cotangents, rule: TileRule, axis_name, tilings):
    x, y, scale, bias, weights, valid, ids, (row_res, col_res) = res
    rt, ct = tilings
    g_r, g_c = cotangents
    n = axis_size(axis_name)
    b = rt.size
    softmax = rule.kind == "logsumexp"
    xp, yp = _pad(x, rt.padded), _pad(y, ct.padded)
    x_masks = _side_masks(valid, ids, b, rt)
    y_masks = _side_masks(valid, ids, ct.size, ct)
    g_r = g_r.astype(F32)
    per_anchor = isinstance(scale, tuple)
    scale, row_scale, col_scale = _anchor_scales(scale, rt, ct)
    sweep = functools.partial(sweep_backward, scale=scale, bias=bias, kind=rule.kind)

    d_x0 = match_varying(jnp.zeros((rt.padded, x.shape[1]), F32), x)
    d_y0 = match_varying(jnp.zeros((ct.padded, y.shape[1]), F32), x)
    zero = match_varying(jnp.zeros((), F32), x)
    d_hyper = HyperGrads(scale=zero, bias=zero)
    if softmax:
        row_grads = _anchor_grads(row_res, g_r, rt.padded)
        # Columns past b (extra negatives, padding) are no anchors: weight 0.
        col_grads = _anchor_grads(col_res, g_c.astype(F32), ct.padded) if rule.columns else None
    else:
        row_grads, col_grads = AnchorGrads(weight=_pad(g_r, rt.padded)), None
    if per_anchor:
        # Each side's scales ride with its anchor statistics (the columns' travel); the
        # per-column d/dscale travels with the block's dy accumulator.
        row_grads = row_grads._replace(scale=row_scale)
        d_hyper = d_hyper._replace(scale=jnp.zeros_like(row_scale))
        if col_grads is not None:
            col_grads = col_grads._replace(scale=col_scale)
            d_y0 = (d_y0, jnp.zeros_like(col_scale))

    # The visiting block carries its data, statistics and masks; its dy accumulator
    # travels too.
    visiting = (yp, col_grads, y_masks) + ((xp, row_grads, x_masks) if rule.intra_view else ())

    def step(visiting, d_y_vis, local, own_block):
        d_x, d_hyper = local
        y_vis, col_vis, y_vis_masks = visiting[:3]
        if isinstance(d_y_vis, tuple):  # per-anchor column scales: their d/dscale travels
            d_y_vis, d_col_scale = d_y_vis
            d_hyper = d_hyper._replace(col_scale=d_col_scale)
        # Cross-view tile: dx (local) += G · y_vis, dy_vis += Gᵀ · x.
        d_x, d_y_vis, d_hyper = sweep(
            xp,
            y_vis,
            row_grads=row_grads,
            col_grads=col_vis,
            d_rows=d_x,
            d_cols=d_y_vis,
            d_hyper=d_hyper,
            row_tiling=rt,
            col_tiling=ct,
            own_block=own_block,
            row_masks=x_masks,
            col_masks=y_vis_masks,
        )
        if d_hyper.col_scale is not None:
            d_y_vis = (d_y_vis, d_hyper.col_scale)
            d_hyper = d_hyper._replace(col_scale=None)
        if rule.intra_view:
            x_vis, row_vis, x_vis_masks = visiting[3:]
            # Same-view tiles hold no positives, and count every pair from both sides.
            same_view = dict(
                row_tiling=rt, col_tiling=rt, own_block=own_block, d_cols=None, hyper_weight=0.5
            )
            # x·x tile: both anchors' terms, accumulated on the local side only (the
            # visiting side gets its own when this block visits it).
            d_x, _, d_hyper = sweep(
                xp,
                x_vis,
                row_grads=row_grads._replace(positive=None),
                col_grads=row_vis._replace(positive=None),
                d_rows=d_x,
                d_hyper=d_hyper,
                row_masks=x_masks,
                col_masks=x_vis_masks,
                **same_view,
            )
            if rule.columns:
                # y·y tile with the visiting block as rows, so that its accumulator (which
                # travels anyway) takes the update and no local dy buffer is needed.
                d_y_vis, _, d_hyper = sweep(
                    y_vis,
                    yp,
                    row_grads=col_vis._replace(positive=None),
                    col_grads=col_grads._replace(positive=None),
                    d_rows=d_y_vis,
                    d_hyper=d_hyper,
                    row_masks=y_vis_masks,
                    col_masks=y_masks,
                    **same_view,
                )
        return d_y_vis, (d_x, d_hyper)

    d_y, (d_x, d_hyper) = ring(step, visiting, d_y0, (d_x0, d_hyper), axis_name=axis_name, n=n)
    d_scale = d_hyper.scale.astype(jnp.result_type(scale))
    if per_anchor:
        d_col = None
        if isinstance(d_y, tuple):
            d_y, d_col = d_y
            d_col = d_col[:b]
        d_scale = (d_hyper.scale[:b], d_col)  # the structure of the primal pair
    d_x, d_y = d_x[:b], d_y[: ct.size]
    # Tile sums of G ∘ (x·yᵀ) and of G; the positives' -c terms sit in the diagonal tiles.
    return (
        d_x.astype(x.dtype),
        d_y.astype(y.dtype),
        d_scale,
        d_hyper.bias.astype(jnp.result_type(bias)),
        None if weights is None else jnp.zeros_like(weights),
        None,  # valid and ids are not differentiable
        None,
    )


# ------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _anchor_losses_vjp(x, y, scale, bias, weights, valid, ids, rule, axis_name, tilings):
    rows, cols, _ = _forward(x, y, scale, bias, weights, valid, ids, rule, axis_name, tilings)
    return rows, cols


def _anchor_losses_fwd(x, y, scale, bias, weights, valid, ids, rule, axis_name, tilings):
    rows, cols, res = _forward(x, y, scale, bias, weights, valid, ids, rule, axis_name, tilings)
    return (rows, cols), (x, y, scale, bias, weights, valid, ids, res)


def _anchor_losses_bwd(rule, axis_name, tilings, res, cotangents):
    return _backward(res, cotangents, rule, axis_name, tilings)


_anchor_losses_vjp.defvjp(_anchor_losses_fwd, _anchor_losses_bwd)


def anchor_losses(
    x: jax.Array,
    y: jax.Array,
    *,
    scale: jax.Array,
    bias: jax.Array,
    weights: jax.Array | None,
    valid: jax.Array | None,
    ids: jax.Array | None,
    rule: TileRule,
    axis_name: AxisName,
    row_tiling: Tiling,
    col_tiling: Tiling,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-anchor losses of the local shard: ``(rows (b,), cols (b,) or None)``, float32.

    x: ``(b, D)``; y: ``(m, D)``, its first ``b`` rows the positives of ``x``. ``scale``
    (= 1 / temperature) and ``bias`` are float32 scalars, or ``scale`` is a pair
    ``(row (b,), col (b,) or None)`` of per-anchor scales of the x anchors and the y
    anchors (individual temperatures; ``logsumexp`` rule without ``intra_view``, column
    scales exactly when ``rule.columns``), differentiable like the scalar; ``weights``
    the DCLW weights of the local positives (or None for 1); ``valid`` ``(m,)`` bool and
    ``ids`` ``(m,)`` int, or None. row_tiling cuts the ``b`` rows of x, col_tiling the
    ``m`` rows of y. Differentiable in x, y, scale, bias.
    """
    if isinstance(scale, tuple):
        if rule.kind != "logsumexp" or rule.intra_view or (rule.columns != (scale[1] is not None)):
            raise ValueError(
                "anchor_losses: per-anchor scales need the logsumexp rule without intra_view, "
                "and column scales exactly when there are column statistics."
            )
        scale = tuple(None if s is None else match_varying(jnp.asarray(s, F32), x) for s in scale)
    else:
        scale = match_varying(jnp.asarray(scale, F32), x)
    bias = match_varying(jnp.asarray(bias, F32), x)
    if weights is not None:
        weights = match_varying(lax.stop_gradient(weights.astype(F32)), x)
    if valid is not None:
        valid = match_varying(valid, x)
    if ids is not None:
        ids = match_varying(ids, x)
    tilings = (row_tiling, col_tiling)
    return _anchor_losses_vjp(x, y, scale, bias, weights, valid, ids, rule, axis_name, tilings)
