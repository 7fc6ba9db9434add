"""Dense reference losses: the whole ``B x B`` similarity matrix, written for clarity.

These are the oracle every tiled, ring and cached path is tested against. They build the
full matrix (``O(B^2)`` memory), so use them only for small batches and for tests.
The formulas are the ones in ``losses/__init__.py`` and DESIGN.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._validate import check_pair

Scalar = float | jax.Array


def _acc(a: jax.Array):
    """Accumulation dtype: float32, or float64 for float64 inputs (the x64 oracle)."""
    return jnp.promote_types(a.dtype, jnp.float32)


def _logits(a: jax.Array, b: jax.Array, temperature: Scalar) -> jax.Array:
    # (B, D) · (D, B) -> (B, B), accumulated in float32 whatever the input dtype.
    s = jnp.einsum("id,jd->ij", a, b, preferred_element_type=_acc(a))
    return s / jnp.asarray(temperature, _acc(a))


def _softmax_losses(
    x: jax.Array,
    y: jax.Array,
    temperature: Scalar,
    *,
    drop_positive: bool,
    weights: jax.Array,
    intra_view: bool,
) -> tuple[jax.Array, jax.Array]:
    """Per-anchor losses of the x->y and y->x directions, each of shape (B,).

    With ``n_i = logsumexp`` of anchor ``i``'s negatives (every other candidate of the
    other view, plus the same view's with ``intra_view``) and ``p_i = s_ii``:
    InfoNCE's ``-log softmax`` is ``log(1 + exp(n_i - p_i)) = softplus(n_i - p_i)``, and
    DCL drops the positive from the denominator: ``n_i - w_i p_i``. The softplus form is
    the same number as ``logsumexp_j s_ij - s_ii`` but keeps its digits when the positive
    dominates (there the difference of two nearly equal terms has none left).
    """
    n = x.shape[0]
    s = _logits(x, y, temperature)
    eye = jnp.eye(n, dtype=bool)
    positive = jnp.diagonal(s)
    negatives = jnp.where(eye, -jnp.inf, s)
    rows, cols = [negatives], [negatives.T]
    if intra_view:
        rows.append(jnp.where(eye, -jnp.inf, _logits(x, x, temperature)))
        cols.append(jnp.where(eye, -jnp.inf, _logits(y, y, temperature)))
    row_neg = jax.nn.logsumexp(jnp.concatenate(rows, axis=1), axis=1)
    col_neg = jax.nn.logsumexp(jnp.concatenate(cols, axis=1), axis=1)
    if drop_positive:
        return row_neg - weights * positive, col_neg - weights * positive
    return jax.nn.softplus(row_neg - positive), jax.nn.softplus(col_neg - positive)


def dclw_weights(x: jax.Array, y: jax.Array, sigma: float) -> jax.Array:
    """DCLW weights ``w_i = 2 - B softmax_i(x_i . y_i / sigma)``, without gradient."""
    positive = jnp.sum(x.astype(_acc(x)) * y.astype(_acc(x)), axis=-1)
    w = 2.0 - x.shape[0] * jax.nn.softmax(positive / sigma)
    return jax.lax.stop_gradient(w)


def infonce(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.07,
    symmetric: bool = True,
    intra_view: bool = False,
) -> jax.Array:
    """Dense InfoNCE / CLIP loss (NT-Xent with ``intra_view=True``)."""
    check_pair(x, y, "infonce", min_batch=1, temperature=temperature)
    weights = jnp.ones((x.shape[0],), _acc(x))
    lr, lc = _softmax_losses(
        x, y, temperature, drop_positive=False, weights=weights, intra_view=intra_view
    )
    return 0.5 * (lr.mean() + lc.mean()) if symmetric else lr.mean()


def decoupled(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.1,
    sigma: float | None = None,
    symmetric: bool = True,
    intra_view: bool = False,
) -> jax.Array:
    """Dense decoupled contrastive loss (DCL; DCLW when ``sigma`` is given)."""
    check_pair(x, y, "decoupled", min_batch=2, temperature=temperature, sigma=sigma)
    n = x.shape[0]
    weights = jnp.ones((n,), _acc(x)) if sigma is None else dclw_weights(x, y, sigma)
    lr, lc = _softmax_losses(
        x, y, temperature, drop_positive=True, weights=weights, intra_view=intra_view
    )
    return 0.5 * (lr.mean() + lc.mean()) if symmetric else lr.mean()


def sigmoid(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.1,
    bias: Scalar = -10.0,
) -> jax.Array:
    """Dense SigLIP sigmoid loss: ``-(1/B) sum_ij log sigmoid(z_ij (s_ij + b))``."""
    check_pair(x, y, "sigmoid", min_batch=1, temperature=temperature)
    n = x.shape[0]
    s = _logits(x, y, temperature) + jnp.asarray(bias, _acc(x))
    z = 2.0 * jnp.eye(n, dtype=_acc(x)) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * s)) / n
