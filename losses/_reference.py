"""Dense reference losses: the whole ``B x M`` similarity matrix, written for clarity.

These are the oracle every tiled, ring and cached path is tested against. They build the
full matrix and its masks (``O(B M)`` memory), so use them only for small batches and for
tests. The semantics are those of ``losses.infonce``, ``losses.decoupled`` and
``losses.sigmoid``, written out plainly:

* ``x`` ``(B, D)``, ``y`` ``(M, D)``: ``y[i]`` is the positive of ``x[i]`` (``i < B``),
  ``y[B:]`` are extra negatives of every x anchor. The y→x direction has the ``B``
  positives as anchors and the ``B`` rows of ``x`` as candidates.
* ``valid`` ``(M,)``: an invalid pair is neither an anchor nor a negative anywhere; an
  invalid extra row of ``y`` is no negative. Losses are means over the ``V`` valid pairs
  (0 when there is none).
* ``ids`` ``(M,)``: a candidate other than the positive that shares its anchor's id is
  no negative (it leaves the denominator, or the sigmoid sum).
* An anchor with no negative at all has loss 0.

Every similarity is ``s_ij = x_i · y_j / τ``, accumulated in float32 (float64 for float64
inputs, the x64 oracle of the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses._validate import as_array, check_masks, check_pair, check_scalar

Scalar = float | jax.Array


def _acc(a: jax.Array):
    """Accumulation dtype: float32, or float64 for float64 inputs (the x64 oracle)."""
    return jnp.promote_types(a.dtype, jnp.float32)


def _logits(a: jax.Array, b: jax.Array, temperature: Scalar) -> jax.Array:
    # (B, D) · (D, M) -> (B, M), accumulated in float32 whatever the input dtype.
    s = jnp.einsum("id,jd->ij", a, b, preferred_element_type=_acc(a))
    return s / jnp.asarray(temperature, _acc(a))


def _check(loss, x, y, valid, ids, *, min_batch=1, intra_view=False, **scalars):
    """The checked ``(x, y)``, as arrays (nested lists accepted, :func:`as_array`)."""
    check_pair(x, y, loss, min_batch=min_batch, dtypes=None, intra_view=intra_view)
    x, y = as_array(loss, "x", x), as_array(loss, "y", y)
    check_masks(loss, valid, ids, y.shape[0])
    for name, value in scalars.items():
        if value is not None:
            check_scalar(loss, name, value, positive=name != "bias")
    return x, y


def _pair_masks(x, y, valid, ids):
    """``(valid_pairs (B,), negative (B, M))``: which pairs count, and which entries of
    ``s`` are negatives of the row's x anchor (for the columns ``j < B``, equally of the
    column's y anchor)."""
    b, m = x.shape[0], y.shape[0]
    v = jnp.ones((m,), bool) if valid is None else valid
    positive = jnp.arange(b)[:, None] == jnp.arange(m)[None, :]
    negative = v[:b, None] & v[None, :] & ~positive
    if ids is not None:
        negative &= ids[:b, None] != ids[None, :]
    return v[:b], negative


def _logsumexp(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Per-row log-sum-exp of the kept entries; rows with none kept get a finite dummy
    (the loss sets those anchors to 0), so that autodiff sees no -inf - -inf."""
    has = jnp.any(keep, axis=1, keepdims=True)
    return jax.nn.logsumexp(jnp.where(keep | ~has, s, -jnp.inf), axis=1)


def _softmax_losses(x, y, temperature, *, drop_positive, weights, intra_view, valid, ids):
    """Per-anchor losses of the x->y and y->x directions, each of shape (B,), 0 for invalid
    anchors and for anchors without negatives.

    With ``n_i = logsumexp`` of anchor ``i``'s negatives (the other view's candidates,
    plus the same view's with ``intra_view``) and ``p_i = s_ii``: InfoNCE's
    ``-log softmax`` is ``log(1 + exp(n_i - p_i)) = softplus(n_i - p_i)``, and DCL drops
    the positive from the denominator: ``n_i - w_i p_i``. The softplus form is the same
    number as ``logsumexp_j s_ij - s_ii`` but keeps its digits when the positive dominates
    (there the difference of two nearly equal terms has none left).
    """
    b = x.shape[0]
    pair, negative = _pair_masks(x, y, valid, ids)
    s = _logits(x, y, temperature)  # (B, M)
    positive = jnp.diagonal(s[:, :b])
    rows, row_keep = [s], [negative]
    cols, col_keep = [s[:, :b].T], [negative[:, :b].T]  # y anchors j < B against x
    if intra_view:  # M = B: the same masks hold within each view
        rows.append(_logits(x, x, temperature))
        row_keep.append(negative)
        cols.append(_logits(y, y, temperature))
        col_keep.append(negative.T)
    out = []
    for parts, keeps in ((rows, row_keep), (cols, col_keep)):
        keep = jnp.concatenate(keeps, axis=1)
        neg = _logsumexp(jnp.concatenate(parts, axis=1), keep)
        loss = neg - weights * positive if drop_positive else jax.nn.softplus(neg - positive)
        out.append(jnp.where(pair & jnp.any(keep, axis=1), loss, 0.0))
    return out


def _mean(losses: jax.Array, pair: jax.Array) -> jax.Array:
    return jnp.sum(losses) / jnp.maximum(jnp.sum(pair), 1)


def dclw_weights(x, y, sigma, valid=None) -> jax.Array:
    """DCLW weights ``w_i = 2 - V softmax_i(x_i . y_i / sigma)`` over the ``V`` valid
    pairs, without gradient; 0 for invalid pairs."""
    b = x.shape[0]
    pair = jnp.ones((b,), bool) if valid is None else valid[:b]
    positive = jnp.sum(x.astype(_acc(x)) * y[:b].astype(_acc(x)), axis=-1) / sigma
    p = jax.nn.softmax(jnp.where(pair, positive, -jnp.inf))  # NaN only if no pair is valid
    w = jnp.where(pair, 2.0 - jnp.sum(pair) * p, 0.0)
    return jax.lax.stop_gradient(w)


def infonce(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.07,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
) -> jax.Array:
    """Dense InfoNCE / CLIP loss (NT-Xent with ``intra_view=True``)."""
    x, y = _check("infonce", x, y, valid, ids, intra_view=intra_view, temperature=temperature)
    weights = jnp.ones((x.shape[0],), _acc(x))
    lr, lc = _softmax_losses(
        x,
        y,
        temperature,
        drop_positive=False,
        weights=weights,
        intra_view=intra_view,
        valid=valid,
        ids=ids,
    )
    pair, _ = _pair_masks(x, y, valid, ids)
    return 0.5 * (_mean(lr, pair) + _mean(lc, pair)) if symmetric else _mean(lr, pair)


def decoupled(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.1,
    sigma: float | None = None,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
) -> jax.Array:
    """Dense decoupled contrastive loss (DCL; DCLW when ``sigma`` is given)."""
    x, y = _check(
        "decoupled",
        x,
        y,
        valid,
        ids,
        intra_view=intra_view,
        temperature=temperature,
        sigma=sigma,
    )
    if y.shape[0] < 2:
        raise ValueError(f"decoupled: needs a batch of at least 2 pairs, got y {y.shape}.")
    n = x.shape[0]
    weights = jnp.ones((n,), _acc(x)) if sigma is None else dclw_weights(x, y, sigma, valid)
    lr, lc = _softmax_losses(
        x,
        y,
        temperature,
        drop_positive=True,
        weights=weights,
        intra_view=intra_view,
        valid=valid,
        ids=ids,
    )
    pair, _ = _pair_masks(x, y, valid, ids)
    return 0.5 * (_mean(lr, pair) + _mean(lc, pair)) if symmetric else _mean(lr, pair)


def sigmoid(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: Scalar = 0.1,
    bias: Scalar = -10.0,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
) -> jax.Array:
    """Dense SigLIP sigmoid loss: ``-(1/V) sum_ij log sigmoid(z_ij (s_ij + b))`` over the
    pairs that count (``z = +1`` on the positives, ``-1`` on the negatives)."""
    x, y = _check("sigmoid", x, y, valid, ids, temperature=temperature, bias=bias)
    pair, negative = _pair_masks(x, y, valid, ids)
    s = _logits(x, y, temperature) + jnp.asarray(bias, _acc(x))
    positive = (jnp.arange(x.shape[0])[:, None] == jnp.arange(y.shape[0])[None, :]) & pair[:, None]
    z = jnp.where(positive, 1.0, -1.0).astype(_acc(x))
    terms = jnp.where(positive | negative, jax.nn.log_sigmoid(z * s), 0.0)
    return -jnp.sum(terms) / jnp.maximum(jnp.sum(pair), 1)


def global_infonce(
    x: jax.Array,
    y: jax.Array,
    log_u_x: jax.Array,
    log_u_y: jax.Array | None = None,
    *,
    gamma: Scalar,
    temperature: Scalar = 0.1,
    temperature_y: jax.Array | None = None,
    rho: Scalar = 0.0,
    epsilon: float = 0.0,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
    """Dense SogCLR / iSogCLR step, written from the papers' equations in linear space.

    Yuan et al. 2022 (arXiv 2202.12387), Qiu et al. 2023 (arXiv 2305.11965): with
    ``h_ij = x_i · y_j`` and anchor ``i``'s ``N_i`` in-batch negatives,
    ``g_i = (1/N_i) Σ_j exp((h_ij − h_ii) / τ_i)``, ``u_i' = (1 − γ) u_i + γ g_i`` and the
    surrogate ``τ_i sg(log(ε + u_i')) + ρ τ_i + sg(τ_i / (ε + u_i')) g_i − sg(...)``,
    whose value is ``τ_i (log(ε + u_i') + ρ)`` and whose gradients are the papers'
    estimators: ``τ_i/(ε + u_i') ∇_w g_i`` and ``log(ε + u_i') + ρ + τ_i/(ε + u_i') ∂g_i/∂τ_i``.
    ``u = exp(log_u)``: no care for overflow (float64 in the tests). Returns
    ``(mean over valid anchors, averaged over directions if symmetric, (log u_x', log u_y'))``.
    """
    x, y = _check("global_infonce", x, y, valid, None, intra_view=intra_view)
    b = x.shape[0]
    acc = _acc(x)
    x, y = x.astype(acc), y.astype(acc)
    pair, negative = _pair_masks(x, y, valid, None)  # (B,), (B, M)
    tau_x = jnp.broadcast_to(jnp.asarray(temperature, acc), (b,))
    tau_y = tau_x if temperature_y is None else jnp.asarray(temperature_y, acc)
    h = x @ y.T  # (B, D) · (D, M) -> (B, M)
    pos = jnp.diagonal(h[:, :b])
    sg = jax.lax.stop_gradient

    def direction(sims, masks, tau, log_u):
        # sims: the anchors' (B, ·) similarity blocks, masks: their negatives.
        keep = jnp.concatenate(masks, axis=1)
        diff = jnp.concatenate(sims, axis=1) - pos[:, None]
        e = jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0) / tau[:, None]), 0.0)
        n = jnp.sum(keep, axis=1)
        active = pair & (n > 0)
        g = jnp.sum(e, axis=1) / jnp.maximum(n, 1)
        u = jnp.exp(log_u.astype(acc))
        u_new = jnp.where(active, (1.0 - gamma) * u + gamma * sg(g), u)
        eu = jnp.where(active, epsilon + u_new, 1.0)
        c = sg(tau / eu)
        terms = tau * (sg(jnp.log(eu)) + rho) + c * g - sg(c * g)
        return jnp.where(active, terms, 0.0), jnp.log(u_new)

    rows, row_keep = [h], [negative]
    cols, col_keep = [h[:, :b].T], [negative[:, :b].T]  # y anchors j < B against x
    if intra_view:
        rows.append(x @ x.T)  # (B, D) · (D, B) -> (B, B)
        row_keep.append(negative)
        cols.append(y @ y.T)  # (B, D) · (D, B) -> (B, B)
        col_keep.append(negative.T)
    count = jnp.maximum(jnp.sum(pair), 1)
    terms_x, new_x = direction(rows, row_keep, tau_x, log_u_x)
    if not symmetric:
        return jnp.sum(terms_x) / count, (new_x, None)
    terms_y, new_y = direction(cols, col_keep, tau_y, log_u_y)
    return 0.5 * (jnp.sum(terms_x) + jnp.sum(terms_y)) / count, (new_x, new_y)
