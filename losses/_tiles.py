"""Tile sweeps: what a loss does with one similarity tile, and loops over all the tiles.

A *sweep* visits every tile of the similarity matrix between a block of anchors ``rows``
(``(Pr, D)``, padded to whole tiles) and a block of candidates ``cols`` (``(Pc, D)``), one
``(tr, tc)`` tile at a time, so that nothing of size ``rows x cols`` exists. The ring
(``_ring.py``, the engine) calls sweeps once per visiting block; a single device is a ring
of one.

Two rules cover the three losses:

* ``logsumexp`` (InfoNCE, NT-Xent, DCL): the forward folds each tile's row (and column)
  log-sum-exp over the *negatives* into running statistics (positives enter the loss
  apart, see ``_ring``); the backward recomputes the tile and forms
  ``G = a_r * exp(s - lse_r) + a_c * exp(s - lse_c)``, minus the positives' terms.
* ``softplus`` (SigLIP): the forward sums ``softplus(-z * (s + b))`` per row, ``z = +1`` on
  the positive pair and ``-1`` elsewhere; the backward is ``G = -g_r * z * sigmoid(-z (s+b))``.

Precision at large logits. A log-sum-exp is carried as the pair ``(m, S)``,
``lse = scale * m + log S``, where ``m`` is the largest *unscaled* product ``x·y`` seen and
``S = sum exp(scale * (x·y - m))`` lies in ``[1, B]``. Both passes evaluate exactly
``exp(scale * (raw - m))``: the difference is taken before scaling, so it is exact near the
maximum and leaves the compiler nothing to contract into a fused multiply-add. (With
``exp(scale * raw - lse)`` the two passes can round differently, by half an ulp of the
logit, 3e-5 at |s| = 1000; every softmax row, and ``dL/dτ``, is then off by as much.)

Masks. Which entries of a tile count is decided from vectors, never from a ``rows x cols``
array: padding from the row and column indices (only the last row and column of tiles
hold any), the positive pair from ``row == col`` on the ring step where a device meets its
own block, and, for batches with ``valid`` or ``ids``, from per-row and per-column
``SideMasks`` (``keep``: a real, valid row; ``ids``: an entry with equal ids on both sides
is no negative). Without those vectors the masks are static switches: the plain case
does no mask work on the tiles that need none.

Every reduction is float32; tiles are multiplied in the input dtype on the matmul units.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TileRule:
    """What a loss computes from a tile. Static (hashable): it selects code, not values.

    kind: ``"logsumexp"`` for the softmax losses, ``"softplus"`` for the sigmoid loss.
    columns: also produce per-column (y-anchor) statistics (symmetric softmax losses).
    drop_positive: leave the positive pair out of the denominators (DCL); the engine always
      sums negatives and positives apart, this decides how they are combined.
    intra_view: add same-view negatives (NT-Xent / SimCLR).
    """

    kind: Literal["logsumexp", "softplus"]
    columns: bool = False
    drop_positive: bool = False
    intra_view: bool = False


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a local block of ``size`` rows is cut: ``count`` tiles of ``tile`` rows."""

    size: int
    tile: int
    count: int

    @property
    def padded(self) -> int:
        return self.tile * self.count

    @property
    def ragged(self) -> bool:
        return self.padded != self.size


class SideMasks(NamedTuple):
    """Per-row (or per-column) masks of one side of a sweep, padded to whole tiles.

    keep: ``(P,)`` bool, False on padding and on rows the caller marked invalid.
    ids: ``(P,)`` int or None; an entry whose two sides share an id is no negative.
    """

    keep: jax.Array
    ids: jax.Array | None


class AnchorGrads(NamedTuple):
    """What the backward sweep needs of each anchor (row or column), ``(P,)`` float32.

    weight: ``logsumexp``: ``g · a``, so that a negative's entry of ``G`` is
      ``weight · exp(scale (x·y - m)) / S``; ``softplus``: the cotangent ``g`` of the row.
    lse: ``(P, 2)`` ``(m, S)`` pairs of the forward (``logsumexp`` only).
    positive: ``g · c``, the positive's entry of ``G`` is ``-positive``; None on sweeps that
      hold no positives (same-view tiles) and for ``softplus``.
    scale: per-anchor scales (``logsumexp`` cross-view sweeps only, see ``sweep_forward``),
      or None for the sweep's scalar ``scale``.
    """

    weight: jax.Array
    lse: jax.Array | None = None
    positive: jax.Array | None = None
    scale: jax.Array | None = None


class HyperGrads(NamedTuple):
    """Running sums of ``G ∘ (rows · colsᵀ)`` and of ``G``: d loss / d scale and / d bias.

    With per-anchor scales, ``scale`` is ``(Pr,)``, each row's sum of its own terms of
    ``G ∘ (rows · colsᵀ)``, and ``col_scale`` ``(Pc,)`` each column's (None without
    column statistics); otherwise ``scale`` is a scalar and ``col_scale`` None.
    """

    scale: jax.Array
    bias: jax.Array
    col_scale: jax.Array | None = None


DEFAULT_TILE = 1024


def choose_tiling(size: int, block_size: int | None) -> Tiling:
    """Tiles of at most ``block_size`` rows (a default when None) covering ``size`` rows.

    The default keeps a float32 tile at 4 MiB or less and, when ``size`` has no divisor
    close to it, evens the tiles out so that padding stays under 8 rows per tile.
    """
    if block_size is None:
        count = -(-size // DEFAULT_TILE)
        tile = -(-size // count)
        if tile % 8 and count > 1:
            tile += 8 - tile % 8
    else:
        tile = min(block_size, size)
        count = -(-size // tile)
    return Tiling(size=size, tile=tile, count=count)


def _on_cpu() -> bool:
    """Whether this trace compiles for XLA:CPU (the default backend, read at trace time)."""
    return jax.default_backend() == "cpu"


def _matmul_operand(a: jax.Array) -> jax.Array:
    # XLA:CPU emits a tile product that is not fused into a loop body (one tile per block:
    # XLA drops the trip-count-1 loops) as a library call, which has no bfloat16 x
    # bfloat16 -> float32 kernel on CPUs without AVX512-BF16 ("Unsupported element type
    # for DotThunk"). Products of bfloat16 values are exact in float32, so widening the
    # operands first gives the same tile on CPU; other backends multiply bfloat16 natively.
    return a.astype(F32) if _on_cpu() and a.dtype != F32 else a


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    # (tr, D) · (D, tc) -> (tr, tc): contract the feature axis of both, accumulate in float32.
    a, b = _matmul_operand(a), _matmul_operand(b)
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_nn(g: jax.Array, b: jax.Array) -> jax.Array:
    # (tr, tc) · (tc, D) -> (tr, D)
    g, b = _matmul_operand(g), _matmul_operand(b)
    return lax.dot_general(g, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _transpose_for_tn(a: jax.Array) -> jax.Array | None:
    """``a`` turned to ``(D, tr)`` once per row of tiles where ``_dot_tn`` wants it (CPU)."""
    return _matmul_operand(a).T if _on_cpu() else None


def _dot_tn(a: jax.Array, a_t: jax.Array | None, g: jax.Array) -> jax.Array:
    """Gᵀ · a: (tc, tr) · (tr, D) -> (tc, D)."""
    g = _matmul_operand(g)
    if a_t is None:
        # (tr, tc)ᵀ · (tr, D) -> (tc, D): contract the tile's row axis directly.
        return lax.dot_general(g, a, (((0,), (0,)), ((), ())), preferred_element_type=F32)
    # XLA:CPU only (measured there): contracting the tile's row axis straight into a
    # (tc, D) result takes ~1.5x as long as (D, tr) · (tr, tc) -> (D, tc) with the anchor
    # block transposed once per row of tiles, then turning the small result
    # (experiments/bench_tile_products.py). The barrier keeps XLA from folding the two
    # transposes back into the slow contraction.
    g_t_a = lax.dot_general(a_t, g, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return lax.optimization_barrier(g_t_a).T


def _softplus(u: jax.Array) -> jax.Array:
    if not _on_cpu():
        return jax.nn.softplus(u)
    # XLA:CPU only (measured there): jax.nn.softplus (a logaddexp with its infinity guards)
    # costs a third of a matmul tile more than log(1 + exp(u)) written out, which is as
    # exact and finite.
    return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


class _TileMasks(NamedTuple):
    keep: jax.Array | None  # (tr, tc) bool: the entry counts (None: every entry does)
    positive: jax.Array | None  # (tr, tc) bool: the positive pair (None: there is none)


def _tile_masks(
    i, j, rt: Tiling, ct: Tiling, *, own_block: bool, masked: bool, kind: str, row_m, col_m
) -> _TileMasks:
    """Which entries of tile (i, j) count, and which is the positive pair.

    For ``logsumexp`` a kept entry is a negative (positives are left out, they enter the
    loss apart); for ``softplus`` it is any pair of the sum, positive or not.
    """
    if not masked:
        return _TileMasks(None, None)
    r = i * rt.tile + lax.broadcasted_iota(jnp.int32, (rt.tile, 1), 0)
    c = j * ct.tile + lax.broadcasted_iota(jnp.int32, (1, ct.tile), 1)
    positive = (r == c) if own_block else None
    if row_m is not None:
        # Padding is False in keep; the tile-local slices of the per-row vectors.
        keep = row_m.keep[i][:, None] & col_m.keep[j][None, :]
        if row_m.ids is not None:
            same = row_m.ids[i][:, None] == col_m.ids[j][None, :]
            keep = keep & ~(same if positive is None else same & ~positive)
    else:
        keep = None
        if rt.ragged:
            keep = r < rt.size
        if ct.ragged:
            keep = (c < ct.size) if keep is None else keep & (c < ct.size)
    if kind == "logsumexp" and positive is not None:
        keep = ~positive if keep is None else keep & ~positive
    return _TileMasks(keep, positive)


def _with_masks(i, j, rt: Tiling, ct: Tiling, own_block: bool, always: bool, fn, *operands):
    """``fn(masked, *operands)``, with masks only on the tiles that need them.

    With per-row masks (``always``) every tile needs them. Otherwise only tiles that cross
    the diagonal of the step where a device meets its own block hold positives, and only
    the last row and column of tiles hold padding; every other tile skips the mask work.
    """
    if always:
        return fn(True, *operands)
    if not (own_block or rt.ragged or ct.ragged):
        return fn(False, *operands)
    need = jnp.bool_(False)
    if own_block:
        if rt.tile == ct.tile:
            need = need | (i == j)
        else:  # rows [i tr, (i+1) tr) and columns [j tc, (j+1) tc) overlap
            need = need | ((i * rt.tile < (j + 1) * ct.tile) & (j * ct.tile < (i + 1) * rt.tile))
    if rt.ragged:
        need = need | (i == rt.count - 1)
    if ct.ragged:
        need = need | (j == ct.count - 1)
    return lax.cond(need, functools.partial(fn, True), functools.partial(fn, False), *operands)


def _tile_lse(raw: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
    """Log-sum-exp of ``scale * raw`` along ``axis`` as ``(m, S)`` pairs, shape ``(t, 2)``;
    ``(-inf, 0)`` where every entry is -inf (masked)."""
    m = jnp.max(raw, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.sum(jnp.exp(scale * (raw - shift)), axis=axis)
    return jnp.stack([jnp.squeeze(m, axis), total], axis=-1)


def combine_lse(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``logaddexp`` of two ``(..., 2)`` arrays of ``(m, S)`` pairs, kept as a pair."""
    m = jnp.maximum(a[..., 0], b[..., 0])
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    total = a[..., 1] * jnp.exp(scale * (a[..., 0] - shift))
    total += b[..., 1] * jnp.exp(scale * (b[..., 0] - shift))
    return jnp.stack([m, total], axis=-1)


def empty_lse(size: int) -> jax.Array:
    """``size`` log-sum-exps of nothing: ``(-inf, 0)`` pairs."""
    # A broadcast, not a scatter into a constant: XLA would fold a (size, 2) constant.
    return jnp.broadcast_to(jnp.array([NEG_INF, 0.0], F32), (size, 2))


def _split(a: jax.Array, tiling: Tiling) -> jax.Array:
    return a.reshape(tiling.count, tiling.tile, *a.shape[1:])


def _split_masks(m: SideMasks | None, tiling: Tiling) -> SideMasks | None:
    if m is None:
        return None
    return SideMasks(_split(m.keep, tiling), None if m.ids is None else _split(m.ids, tiling))


def _kept_rows(a: jax.Array, m: SideMasks | None, k) -> jax.Array:
    """Tile ``k``'s rows with invalid ones zeroed: whatever they hold (NaN included) then
    contributes exactly 0 to every product. O(t D), against the tile product's O(t² D)."""
    return a if m is None else jnp.where(m.keep[k][:, None], a, jnp.zeros((), a.dtype))


# ----------------------------------------------------------------------------- forward


def sweep_forward(
    rows: jax.Array,
    cols: jax.Array,
    *,
    scale: jax.Array,
    bias: jax.Array,
    row_acc: jax.Array,
    col_acc: jax.Array | None,
    row_tiling: Tiling,
    col_tiling: Tiling,
    kind: str,
    own_block: bool,
    row_masks: SideMasks | None = None,
    col_masks: SideMasks | None = None,
    row_scale: jax.Array | None = None,
    col_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Fold every tile of ``rows · colsᵀ`` into per-row (and per-column) statistics.

    rows: ``(Pr, D)`` with ``Pr = row_tiling.padded``; cols: ``(Pc, D)``. row_acc, col_acc:
    float32 running statistics, ``(P, 2)`` log-sum-exp pairs of the negatives for
    ``logsumexp``, ``(P,)`` sums for ``softplus``; col_acc is None when no column statistics
    are wanted. ``own_block``: the sweep pairs a device's block with itself, so entry
    ``(k, k)`` is the positive pair. row_masks, col_masks: both or neither.
    row_scale ``(Pr,)``, col_scale ``(Pc,)``: per-anchor scales (``logsumexp`` only): row
    ``i``'s statistics are those of ``row_scale_i · rows_i · cols_j``, column ``j``'s of
    ``col_scale_j · rows_i · cols_j`` (individual temperatures); None: ``scale`` for all.
    """
    rt, ct = row_tiling, col_tiling
    rows_t, cols_t = _split(rows, rt), _split(cols, ct)
    rm, cm = _split_masks(row_masks, rt), _split_masks(col_masks, ct)
    rs = None if row_scale is None else _split(row_scale, rt)
    cs = None if col_scale is None else _split(col_scale, ct)
    row_acc = _split(row_acc, rt)
    col_acc = None if col_acc is None else _split(col_acc, ct)
    masks = functools.partial(_tile_masks, own_block=own_block, kind=kind, row_m=rm, col_m=cm)

    def tile(masked, i, j, r_acc, c_acc):
        a, b = _kept_rows(rows_t[i], rm, i), _kept_rows(cols_t[j], cm, j)
        raw = _dot_nt(a, b)  # (tr, D) · (D, tc) -> (tr, tc)
        keep, positive = masks(i, j, rt, ct, masked=masked)
        if kind == "softplus":
            u = raw * scale + bias
            if positive is not None:
                u = jnp.where(positive, -u, u)
            term = _softplus(u)
            if keep is not None:
                term = jnp.where(keep, term, 0.0)
            return r_acc + jnp.sum(term, axis=1), c_acc
        if keep is not None:  # masked entries vanish from every log-sum-exp
            raw = jnp.where(keep, raw, NEG_INF)
        if rs is None:
            r_acc = combine_lse(r_acc, _tile_lse(raw, scale, axis=1), scale)
        else:  # each row (column) at its own scale: a (tr, 1) ((1, tc)) broadcast
            r_acc = combine_lse(r_acc, _tile_lse(raw, rs[i][:, None], axis=1), rs[i])
        if c_acc is not None:
            c_scale, c_tile = (scale, scale) if cs is None else (cs[j], cs[j][None, :])
            c_acc = c_acc.at[j].set(combine_lse(c_acc[j], _tile_lse(raw, c_tile, axis=0), c_scale))
        return r_acc, c_acc

    def row_step(i, carry):
        row_acc, col_acc = carry

        def col_step(j, inner):
            r, c = inner
            return _with_masks(i, j, rt, ct, own_block, rm is not None, tile, i, j, r, c)

        r, col_acc = lax.fori_loop(0, ct.count, col_step, (row_acc[i], col_acc))
        return row_acc.at[i].set(r), col_acc

    row_acc, col_acc = lax.fori_loop(0, rt.count, row_step, (row_acc, col_acc))
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    return flat(row_acc), None if col_acc is None else flat(col_acc)


# ---------------------------------------------------------------------------- backward


def sweep_backward(
    rows: jax.Array,
    cols: jax.Array,
    *,
    scale: jax.Array,
    bias: jax.Array,
    row_grads: AnchorGrads,
    col_grads: AnchorGrads | None,
    d_rows: jax.Array,
    d_cols: jax.Array | None,
    d_hyper: HyperGrads,
    row_tiling: Tiling,
    col_tiling: Tiling,
    kind: str,
    own_block: bool,
    row_masks: SideMasks | None = None,
    col_masks: SideMasks | None = None,
    hyper_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array | None, HyperGrads]:
    """Recompute every tile, form ``G = dL/ds`` and accumulate ``G · cols`` and ``Gᵀ · rows``.

    row_grads: what each row anchor contributes to ``G`` (see ``AnchorGrads``); col_grads
    the same per column, or None when columns have no loss of their own.
    d_rows ``(Pr, D)``, d_cols ``(Pc, D)``: float32 accumulators of ``scale * G · cols`` and
    ``scale * Gᵀ · rows``; d_cols may be None. d_hyper: running ``HyperGrads``, each tile
    counted with ``hyper_weight`` (½ where every pair is swept twice, once from each side).

    Per-anchor scales (``row_grads.scale`` not None, ``logsumexp`` cross-view sweeps): the
    row and column terms of ``G`` are taken at their anchors' scales and folded into
    ``G̃ = row_scale ∘ G_rows + G_cols ∘ col_scale`` (the gradient in the products
    ``rows · colsᵀ``), so d_rows gets ``G̃ · cols`` and d_cols ``G̃ᵀ · rows``; d_hyper then
    holds ``(Pr,)`` row sums (and ``(Pc,)`` column sums) of each side's ``G ∘ (rows ·
    colsᵀ)``: the per-anchor d loss / d scale.
    """
    rt, ct = row_tiling, col_tiling
    rows_t, cols_t = _split(rows, rt), _split(cols, ct)
    rm, cm = _split_masks(row_masks, rt), _split_masks(col_masks, ct)
    rg = jax.tree.map(lambda v: _split(v, rt), row_grads)
    cg = None if col_grads is None else jax.tree.map(lambda v: _split(v, ct), col_grads)
    d_rows = _split(d_rows, rt)
    d_cols = None if d_cols is None else _split(d_cols, ct)
    dtype = rows.dtype
    per_anchor = rg.scale is not None
    if per_anchor:
        d_hyper = d_hyper._replace(
            scale=_split(d_hyper.scale, rt),
            col_scale=None if d_hyper.col_scale is None else _split(d_hyper.col_scale, ct),
        )
    masks = functools.partial(_tile_masks, own_block=own_block, kind=kind, row_m=rm, col_m=cm)

    def grad_tile(i, j, raw, masked):
        keep, positive = masks(i, j, rt, ct, masked=masked)
        if kind == "softplus":
            g_r = rg.weight[i][:, None]
            u = raw * scale + bias
            if positive is None:
                g = g_r * jax.nn.sigmoid(u)
            else:  # z = +1 on the positive: d softplus(-u)/du = -sigmoid(-u)
                g = g_r * jnp.where(positive, -jax.nn.sigmoid(-u), jax.nn.sigmoid(u))
            return g if keep is None else jnp.where(keep, g, 0.0)
        lse_r, w_r = rg.lse[i], rg.weight[i]
        g = (w_r / lse_r[:, 1])[:, None] * jnp.exp(scale * (raw - lse_r[:, 0:1]))
        if cg is not None:
            lse_c, w_c = cg.lse[j], cg.weight[j]
            g = g + (w_c / lse_c[:, 1])[None, :] * jnp.exp(scale * (raw - lse_c[None, :, 0]))
        if keep is not None:
            g = jnp.where(keep, g, 0.0)
        if positive is not None and rg.positive is not None:
            # The positive's own term: dℓ_k/ds_kk = -c_k, times the anchor's cotangent.
            c = rg.positive[i][:, None]
            if cg is not None:
                c = c + cg.positive[j][None, :]
            g = g - jnp.where(positive, c, 0.0)
        return g

    def grad_tile_per_anchor(i, j, raw, masked):
        """``G̃`` and each side's sums of its own terms ``G_side ∘ raw`` (per row, per column),
        every side's terms taken at its own anchors' scales."""
        keep, positive = masks(i, j, rt, ct, masked=masked)
        sides = [(rg, i, 1)] + ([(cg, j, 0)] if cg is not None else [])
        g_t, sums = None, []
        for side, k, axis in sides:
            # Row anchors broadcast along the tile's columns (axis 1), column anchors along
            # its rows (axis 0).
            expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])
            lse, sc = side.lse[k], expand(side.scale[k])
            g = expand(side.weight[k] / lse[:, 1]) * jnp.exp(sc * (raw - expand(lse[:, 0])))
            if keep is not None:
                g = jnp.where(keep, g, 0.0)
            if positive is not None and side.positive is not None:
                g = g - jnp.where(positive, expand(side.positive[k]), 0.0)
            sums.append(jnp.sum(g * raw, axis=axis))
            g_t = sc * g if g_t is None else g_t + sc * g
        return g_t, sums[0], sums[1] if len(sums) > 1 else None

    def row_step(i, carry):
        d_rows, d_cols, d_hyper = carry
        a = _kept_rows(rows_t[i], rm, i)
        a_t = None if d_cols is None else _transpose_for_tn(a)  # once per row of tiles

        def tile(masked, j, d_a, d_cols, d_hyper):
            b = _kept_rows(cols_t[j], cm, j)
            raw = _dot_nt(a, b)  # (tr, D) · (D, tc) -> (tr, tc)
            if per_anchor:
                return tile_per_anchor(masked, j, b, raw, d_a, d_cols, d_hyper)
            g = grad_tile(i, j, raw, masked)
            gq = g.astype(dtype)
            d_a = d_a + scale * _dot_nn(gq, b)  # (tr, tc) · (tc, D) -> (tr, D)
            if d_cols is not None:
                d_cols = d_cols.at[j].add(scale * _dot_tn(a, a_t, gq))  # (tc, tr)·(tr, D)
            # dL/dscale summed tile by tile, like the dense autodiff does: the row sums of
            # G are ~0, and any rearranged form of this sum loses digits at large logits.
            d_scale = d_hyper.scale + hyper_weight * jnp.sum(g * raw)
            d_bias = d_hyper.bias
            if kind == "softplus":
                d_bias = d_bias + hyper_weight * jnp.sum(g)
            return d_a, d_cols, HyperGrads(scale=d_scale, bias=d_bias)

        def tile_per_anchor(masked, j, b, raw, d_a, d_cols, d_hyper):
            # The scales are inside G̃ already: the products take no factor.
            g_t, row_sum, col_sum = grad_tile_per_anchor(i, j, raw, masked)
            gq = g_t.astype(dtype)
            d_a = d_a + _dot_nn(gq, b)  # (tr, tc) · (tc, D) -> (tr, D)
            if d_cols is not None:
                d_cols = d_cols.at[j].add(_dot_tn(a, a_t, gq))  # (tc, tr) · (tr, D)
            # Per-anchor d/dscale, summed tile by tile over each anchor's own terms.
            d_scale = d_hyper.scale.at[i].add(row_sum)
            d_col = d_hyper.col_scale
            if col_sum is not None:
                d_col = d_col.at[j].add(col_sum)
            return d_a, d_cols, d_hyper._replace(scale=d_scale, col_scale=d_col)

        def col_step(j, inner):
            return _with_masks(i, j, rt, ct, own_block, rm is not None, tile, j, *inner)

        d_a, d_cols, d_hyper = lax.fori_loop(0, ct.count, col_step, (d_rows[i], d_cols, d_hyper))
        return d_rows.at[i].set(d_a), d_cols, d_hyper

    d_rows, d_cols, d_hyper = lax.fori_loop(0, rt.count, row_step, (d_rows, d_cols, d_hyper))
    dim = rows.shape[1]
    if per_anchor:
        flat = lambda v: None if v is None else v.reshape(-1)
        d_hyper = d_hyper._replace(scale=flat(d_hyper.scale), col_scale=flat(d_hyper.col_scale))
    return (
        d_rows.reshape(-1, dim),
        None if d_cols is None else d_cols.reshape(-1, dim),
        d_hyper,
    )
