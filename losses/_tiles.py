"""The blockwise engine: what a loss does with one similarity tile, and sweeps over tiles.

A *sweep* visits every tile of the similarity matrix between a block of anchors ``rows``
(``nb * t`` rows, already padded) and a block of candidates ``cols`` (same shape), one
``(t, t)`` tile at a time, so that nothing of size ``rows x cols`` exists. The ring
(``_ring.py``) calls sweeps once per visiting block; a single device is a ring of one.

Two rules cover the three losses:

* ``logsumexp`` (InfoNCE, NT-Xent, DCL): the forward folds each tile's row (and column)
  log-sum-exp into running statistics; the backward recomputes the tile and forms
  ``G = a_r * exp(s - lse_r) + a_c * exp(s - lse_c)``.

Precision at large logits. A log-sum-exp is carried as the pair ``(m, S)``,
``lse = scale * m + log S``, where ``m`` is the largest *unscaled* product ``x·y`` seen and
``S = sum exp(scale * (x·y - m))`` lies in ``[1, B]``. Both passes evaluate exactly
``exp(scale * (raw - m))``: the difference is taken before scaling, so it is exact near the
maximum and leaves the compiler nothing to contract into a fused multiply-add. (With
``exp(scale * raw - lse)`` the two passes can round differently, by half an ulp of the
logit, 3e-5 at |s| = 1000; every softmax row, and ``dL/dτ``, is then off by as much.)
* ``softplus`` (SigLIP): the forward sums ``softplus(-z * (s + b))`` per row, ``z = +1`` on
  the positive pair and ``-1`` elsewhere; the backward is ``G = -g_r * z * sigmoid(-z (s+b))``.

Every reduction is float32; tiles are multiplied in the input dtype on the matmul units.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

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


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    # (t, D) · (D, t) -> (t, t): contract the feature axis of both, accumulate in float32.
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_nn(g: jax.Array, b: jax.Array) -> jax.Array:
    # (t, t) · (t, D) -> (t, D)
    return lax.dot_general(g, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a_t: jax.Array, g: jax.Array) -> jax.Array:
    # (D, t) · (t, t) -> (D, t), then -> (t, D): Gᵀ · a. XLA:CPU takes ~1.5x as long to
    # contract the tile's row axis straight into a (t, D) result as for this product of the
    # transposed anchor block (made once per row of tiles) and the turn of the small result
    # (experiments/bench_tile_products.py). The barrier keeps XLA from folding the two
    # transposes back into the slow contraction.
    g_t_a = lax.dot_general(a_t, g, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return lax.optimization_barrier(g_t_a).T


def _tile_masks(i, j, tiling: Tiling, diagonal: bool, masked: bool):
    """(valid, positive) masks of tile (i, j), or None where nothing needs masking.

    valid: the entry is a real pair (not padding).
    positive: the entry is on the diagonal of the ring step that pairs a block with itself.
    """
    if not masked:
        return None, None
    t = tiling.tile
    r = i * t + lax.broadcasted_iota(jnp.int32, (t, 1), 0)
    c = j * t + lax.broadcasted_iota(jnp.int32, (1, t), 1)
    valid = (r < tiling.size) & (c < tiling.size) if tiling.ragged else None
    positive = (r == c) if diagonal else None
    return valid, positive


def _with_masks(i, j, tiling: Tiling, diagonal: bool, fn, *operands):
    """``fn(masked, *operands)``, with masks only on the tiles that need them.

    Only diagonal tiles of the step that pairs a block with itself hold positives, and only
    the last row and column of tiles hold padding; every other tile skips the mask work.
    """
    if not (diagonal or tiling.ragged):
        return fn(False, *operands)
    last = tiling.count - 1
    need = jnp.bool_(False)
    if diagonal:
        need = need | (i == j)
    if tiling.ragged:
        need = need | (i == last) | (j == last)
    return lax.cond(need, functools.partial(fn, True), functools.partial(fn, False), *operands)


def _masked_logits(s, valid, drop):
    """Set padding and dropped entries to -inf so they vanish from every log-sum-exp."""
    keep = None
    if valid is not None:
        keep = valid
    if drop is not None:
        keep = ~drop if keep is None else keep & ~drop
    return s if keep is None else jnp.where(keep, s, NEG_INF), keep


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


def lse_value(pairs: jax.Array, scale: jax.Array) -> jax.Array:
    """The log-sum-exps ``scale * m + log S`` of ``(..., 2)`` pairs."""
    return scale * pairs[..., 0] + jnp.log(pairs[..., 1])


def empty_lse(size: int) -> jax.Array:
    """``size`` log-sum-exps of nothing: ``(-inf, 0)`` pairs."""
    # A broadcast, not a scatter into a constant: XLA would fold a (size, 2) constant.
    return jnp.broadcast_to(jnp.array([NEG_INF, 0.0], F32), (size, 2))


def _softplus(u: jax.Array) -> jax.Array:
    # log(1 + exp(u)) written out: jax.nn.softplus (a logaddexp with its infinity guards)
    # costs XLA:CPU a third of a matmul tile more; this form is as exact and finite.
    return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


def _split(a: jax.Array, tiling: Tiling) -> jax.Array:
    return a.reshape(tiling.count, tiling.tile, *a.shape[1:])


# ----------------------------------------------------------------------------- forward


def sweep_forward(
    rows: jax.Array,
    cols: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    row_acc: jax.Array,
    col_acc: jax.Array | None,
    *,
    tiling: Tiling,
    kind: str,
    diagonal: bool,
    drop_diagonal: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """Fold every tile of ``rows · colsᵀ`` into per-row (and per-column) statistics.

    rows, cols: ``(P, D)`` with ``P = tiling.padded``. row_acc, col_acc: float32 running
    statistics, ``(P, 2)`` log-sum-exp pairs for ``logsumexp``, ``(P,)`` sums for
    ``softplus``; col_acc is None when no column statistics are wanted. ``diagonal``:
    this sweep pairs a block with itself, so entry ``(k, k)`` is the positive pair;
    ``drop_diagonal`` leaves it out.
    """
    rows_t, cols_t = _split(rows, tiling), _split(cols, tiling)
    row_acc = _split(row_acc, tiling)
    col_acc = None if col_acc is None else _split(col_acc, tiling)

    def tile(masked, i, j, r_acc, c_acc):
        raw = _dot_nt(rows_t[i], cols_t[j])  # (t, D) · (D, t) -> (t, t)
        valid, positive = _tile_masks(i, j, tiling, diagonal, masked)
        if kind == "softplus":
            u = raw * scale + bias
            if positive is not None:
                u = jnp.where(positive, -u, u)
            term = _softplus(u)
            if valid is not None:
                term = jnp.where(valid, term, 0.0)
            return r_acc + jnp.sum(term, axis=1), c_acc
        raw, _ = _masked_logits(raw, valid, positive if drop_diagonal else None)
        r_acc = combine_lse(r_acc, _tile_lse(raw, scale, axis=1), scale)
        if c_acc is not None:
            c_acc = c_acc.at[j].set(combine_lse(c_acc[j], _tile_lse(raw, scale, axis=0), scale))
        return r_acc, c_acc

    def row_step(i, carry):
        row_acc, col_acc = carry

        def col_step(j, inner):
            r, c = inner
            return _with_masks(i, j, tiling, diagonal, tile, i, j, r, c)

        r, col_acc = lax.fori_loop(0, tiling.count, col_step, (row_acc[i], col_acc))
        return row_acc.at[i].set(r), col_acc

    row_acc, col_acc = lax.fori_loop(0, tiling.count, row_step, (row_acc, col_acc))
    flat = lambda a: a.reshape(tiling.padded, *a.shape[2:])
    return flat(row_acc), None if col_acc is None else flat(col_acc)


# ---------------------------------------------------------------------------- backward


def sweep_backward(
    rows: jax.Array,
    cols: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    row_stats: tuple[jax.Array, ...],
    col_stats: tuple[jax.Array, ...] | None,
    d_rows: jax.Array,
    d_cols: jax.Array | None,
    d_hyper: jax.Array,
    *,
    tiling: Tiling,
    kind: str,
    diagonal: bool,
    drop_diagonal: bool,
    hyper_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Recompute every tile, form ``G = dL/ds`` and accumulate ``G · cols`` and ``Gᵀ · rows``.

    row_stats: for ``logsumexp``, ``(lse, ga)`` per row, ``lse`` as ``(m, S)`` pairs: a
    negative's entry of ``G`` is ``ga · exp(scale (x·y - m)) / S``; with a third entry
    ``gc`` on the step that holds the positives, whose entry is ``-gc`` (see
    ``_ring._softmax_anchor_losses``). ``(g,)`` for
    ``softplus``, ``g`` the cotangent of the row's loss.
    col_stats: the same per column, or None when columns have no loss of their own.
    d_rows, d_cols: ``(P, D)`` float32 accumulators of ``scale * G · cols`` and
    ``scale * Gᵀ · rows``; d_cols may be None. d_hyper: ``(2,)`` float32 accumulator of
    ``(sum G ∘ (rows · colsᵀ), sum G)``, the gradients of the scale and of the bias,
    counted with ``hyper_weight`` (½ where every pair is swept twice, once from each side).
    """
    rows_t, cols_t = _split(rows, tiling), _split(cols, tiling)
    rs = tuple(_split(v, tiling) for v in row_stats)
    cs = None if col_stats is None else tuple(_split(v, tiling) for v in col_stats)
    d_rows = _split(d_rows, tiling)
    d_cols = None if d_cols is None else _split(d_cols, tiling)
    dtype = rows.dtype

    def grad_tile(i, j, raw, masked):
        valid, positive = _tile_masks(i, j, tiling, diagonal, masked)
        if kind == "softplus":
            g_r = rs[0][i][:, None]
            u = raw * scale + bias
            if positive is None:
                g = g_r * jax.nn.sigmoid(u)
            else:  # z = +1 on the positive: d softplus(-u)/du = -sigmoid(-u)
                g = g_r * jnp.where(positive, -jax.nn.sigmoid(-u), jax.nn.sigmoid(u))
            return g if valid is None else jnp.where(valid, g, 0.0)
        _, keep = _masked_logits(raw, valid, positive if drop_diagonal else None)
        lse_r, a_r = rs[0][i], rs[1][i]
        g = (a_r / lse_r[:, 1])[:, None] * jnp.exp(scale * (raw - lse_r[:, 0:1]))
        if cs is not None:
            lse_c, a_c = cs[0][j], cs[1][j]
            g = g + (a_c / lse_c[:, 1])[None, :] * jnp.exp(scale * (raw - lse_c[None, :, 0]))
        if keep is not None:
            g = jnp.where(keep, g, 0.0)
        if positive is not None and len(rs) > 2:
            # The positive's own term: dℓ_k/ds_kk = -c_k, times the anchor's cotangent.
            cg = rs[2][i][:, None] + (cs[2][j][None, :] if cs is not None else 0.0)
            g = g - jnp.where(positive, cg, 0.0)
        return g

    def row_step(i, carry):
        d_rows, d_cols, d_hyper = carry
        a = rows_t[i]
        a_t = None if d_cols is None else a.T  # (D, t), for every Gᵀ · a of this row

        def tile(masked, j, d_a, d_cols, d_hyper):
            b = cols_t[j]
            raw = _dot_nt(a, b)  # (t, D) · (D, t) -> (t, t)
            g = grad_tile(i, j, raw, masked)
            gq = g.astype(dtype)
            d_a = d_a + scale * _dot_nn(gq, b)  # (t, t) · (t, D) -> (t, D)
            if d_cols is not None:
                d_cols = d_cols.at[j].add(scale * _dot_tn(a_t, gq))  # (D, t) · (t, t) -> ᵀ
            # dL/dscale summed tile by tile, like the dense autodiff does: the row sums of
            # G are ~0, and any rearranged form of this sum loses digits at large logits.
            d_tile = jnp.stack([jnp.sum(g * raw), jnp.sum(g) if kind == "softplus" else 0.0])
            return d_a, d_cols, d_hyper + hyper_weight * d_tile

        def col_step(j, inner):
            return _with_masks(i, j, tiling, diagonal, tile, j, *inner)

        d_a, d_cols, d_hyper = lax.fori_loop(
            0, tiling.count, col_step, (d_rows[i], d_cols, d_hyper)
        )
        return d_rows.at[i].set(d_a), d_cols, d_hyper

    d_rows, d_cols, d_hyper = lax.fori_loop(0, tiling.count, row_step, (d_rows, d_cols, d_hyper))
    return (
        d_rows.reshape(-1, rows.shape[1]),
        (None if d_cols is None else d_cols.reshape(-1, rows.shape[1])),
        d_hyper,
    )
