"""The global contrastive loss (SogCLR) and individual temperatures (iSogCLR), tiled.

Small batches that optimise the large-batch objective: per-anchor moving averages of the
negatives' sum stand in for the sum over the whole data set (Yuan et al., ICML 2022,
arXiv 2202.12387), optionally with a temperature per anchor learned through the robust
(DRO) form of the same loss (Qiu et al., ICML 2023, arXiv 2305.11965).

Which losses take it. The papers define the estimator for the softmax (log-sum-exp)
losses: an anchor's objective is a function of a *sum over all its negatives* in the
data set, and the moving average tracks that sum. InfoNCE / CLIP (both directions) and
NT-Xent (``intra_view=True``, SimCLR's one-tower case, the paper's main setting) are
covered; at ``γ = 1`` its gradient is ``τ`` times DCL's (see ``global_infonce``). The sigmoid loss
(SigLIP) takes none: it is already a plain sum of independent per-pair terms, so a
mini-batch gives an unbiased estimate of the full-data loss and its gradient, and there
is no inner sum under a non-linearity for a moving average to track.

Engine. The per-anchor quantity ``log ĝ_i`` is, up to the constant ``log N_i``, the
decoupled loss's per-anchor term ``logsumexp_{j≠i} s_ij − s_ii``; the engine
(``_ring.anchor_losses`` with the DCL tile rule) computes it tile by tile and around the
ring, with its custom VJP, from the row and column log-sum-exp statistics it already
keeps. Individual temperatures enter it as per-anchor scales ``1/τ_i`` (each row's and
each column's statistics at its own anchor's scale, the column scales travelling with
their block around the ring), with per-anchor ``d/dscale`` from the backward sweep. This
module only turns those per-anchor values into the moving average and the paper's
gradient weights, elementwise on ``(b,)`` vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from losses._axes import AxisName
from losses._common import anchor_count, global_sum, prepare
from losses._ring import anchor_losses
from losses._tiles import F32, TileRule, Tiling, choose_tiling
from losses._validate import _static_value, check_scalar, checked_scalar

_NAME = "global_infonce"


def _check_state(name: str, log_u, b: int) -> jax.Array:
    """A ``(b,)`` floating array of per-anchor ``log u`` (``-inf`` allowed: ``u = 0``)."""
    if log_u is None:
        raise ValueError(f"{_NAME}: {name} is needed (one log u per anchor, shape ({b},)).")
    if not hasattr(log_u, "shape"):
        log_u = jnp.asarray(log_u)
    if jnp.shape(log_u) != (b,):
        raise ValueError(
            f"{_NAME}: {name} must have shape ({b},), one entry per local anchor (row of x), "
            f"got shape {jnp.shape(log_u)}."
        )
    if not jnp.issubdtype(jnp.result_type(log_u), jnp.floating):
        raise TypeError(
            f"{_NAME}: {name} must be a float array (log u), got dtype {jnp.result_type(log_u)}."
        )
    return jnp.asarray(log_u, F32)


def _check_temperature(name: str, t, b: int) -> tuple[jax.Array, bool]:
    """``(τ as float32, per_anchor)``: a positive scalar, or a ``(b,)`` vector of them."""
    if t is not None and hasattr(t, "shape") and jnp.ndim(t) == 1 and jnp.shape(t) != (1,):
        if jnp.shape(t) != (b,):
            raise ValueError(
                f"{_NAME}: {name} must be a scalar or have shape ({b},), one per local anchor, "
                f"got shape {jnp.shape(t)}."
            )
        if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
            raise TypeError(f"{_NAME}: {name} must be a float array, got {jnp.result_type(t)}.")
        v = jnp.asarray(t, F32)
        if not isinstance(t, jax.core.Tracer):
            if not bool(jnp.all(jnp.isfinite(v) & (v > 0))):
                raise ValueError(f"{_NAME}: every entry of {name} must be finite and > 0.")
        else:
            ok = jnp.all(jnp.isfinite(v) & (v > 0))
            checkify.debug_check(ok, f"{_NAME}: every entry of {name} must be finite and > 0.")
        return v, True
    check_scalar(_NAME, name, t, positive=True)
    return checked_scalar(_NAME, name, t, positive=True), False


def _check_rate(gamma) -> jax.Array:
    check_scalar(_NAME, "gamma", gamma, positive=True)
    v = _static_value(gamma)
    if v is not None and v > 1:
        raise ValueError(f"{_NAME}: gamma must be in (0, 1], got {v}.")
    g = jnp.asarray(gamma, F32).reshape(())
    if v is None:
        checkify.debug_check(
            (g > 0) & (g <= 1), f"{_NAME}: gamma must be in (0, 1], got {{g}}.", g=g
        )
    return g


def _nonnegative(name: str, value) -> jax.Array:
    check_scalar(_NAME, name, value, positive=False)
    v = _static_value(value)
    if v is not None and v < 0:
        raise ValueError(f"{_NAME}: {name} must be >= 0, got {v}.")
    return jnp.asarray(value, F32).reshape(())


# With per-anchor scales the backward keeps each side's terms of a tile apart (its own
# scale, its own d/dscale sums): about two more tile-sized temporaries than the scalar
# case (measured: 2.2x the temporaries at the engine's default 1024-row tile, B = 65,536).
# A default tile of half the edge keeps them under the scalar loss's (and, like the
# engine's 1024, divides the power-of-two batches, which then need no padded copy).
_PER_ANCHOR_TILE = 512


def _per_anchor_tiling(size: int) -> Tiling:
    """The default tiling for per-anchor temperatures: as ``choose_tiling``'s default (even
    tiles, padding under 8 rows each) with tiles of at most ``_PER_ANCHOR_TILE`` rows."""
    count = -(-size // _PER_ANCHOR_TILE)
    tile = -(-size // count)
    if tile % 8 and count > 1:
        tile += 8 - tile % 8
    return choose_tiling(size, tile)


def _direction(d, count, log_u, tau, *, gamma, log_eps, rho, active):
    """One direction's state update and surrogate terms, elementwise over ``(b,)`` anchors.

    d: the engine's ``logsumexp_{j≠i} s_ij − s_ii`` (differentiable); count: ``N_i``, the
    number of negatives (a global count, the same for every anchor); tau: ``τ_i`` (or a
    scalar). Returns ``(terms (b,), new log u (b,))``: the terms' sum has the value
    ``Σ_i τ_i (log(ε + u_i') + ρ)`` and the gradient of the paper's estimator.
    """
    log_g = lax.stop_gradient(d) - jnp.log(jnp.maximum(count, 1.0))  # log ĝ_i
    # u' = (1 − γ) u + γ ĝ in log space: exp never sees a logit, so no overflow at small τ.
    log_u_new = jnp.logaddexp(jnp.log1p(-gamma) + log_u, jnp.log(gamma) + log_g)
    log_u_new = jnp.where(active, log_u_new, log_u)  # no negative seen: the state stays
    log_eu = jnp.logaddexp(log_eps, log_u_new)  # log(ε + u')
    log_eu = jnp.where(active, log_eu, 0.0)  # finite everywhere, so that 0 · it is 0
    # The gradient weight τ_i ĝ_i / (ε + u_i') <= τ_i / γ: bounded whatever the logits.
    weight = jnp.where(active, jnp.exp(jnp.where(active, log_g, 0.0) - log_eu), 0.0)
    weight = weight * lax.stop_gradient(tau)
    # value τ (log(ε + u') + ρ); d/dτ: log(ε + u') + ρ + weight · ∂ log ĝ / ∂τ; d/dw: weight
    # · ∇ log ĝ = τ / (ε + u') ∇ĝ. (d − stop_gradient(d)) is 0 and carries ∇ log ĝ.
    terms = tau * (log_eu + rho) + weight * (d - lax.stop_gradient(d))
    return jnp.where(active, terms, 0.0), lax.stop_gradient(log_u_new)


def global_infonce(
    x: jax.Array,
    y: jax.Array,
    log_u_x: jax.Array,
    log_u_y: jax.Array | None = None,
    *,
    gamma: float | jax.Array,
    temperature: float | jax.Array = 0.1,
    temperature_y: jax.Array | None = None,
    rho: float | jax.Array = 0.0,
    epsilon: float = 0.0,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
    block_size: int | None = None,
    axis_name: AxisName = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
    r"""Global contrastive loss (SogCLR; iSogCLR with per-anchor temperatures), tiled.

    Yuan et al. (ICML 2022, arXiv 2202.12387) minimise the *global* contrastive objective,
    each anchor contrasted with all its negatives in the data set ``S_i⁻``:

    ``F(w, τ) = (1/n) Σ_i τ_i [log(ε + g_i(w, τ_i)) + ρ]``,
    ``g_i = (1/|S_i⁻|) Σ_{j∈S_i⁻} exp((h_ij − h_ii) / τ_i)``, ``h_ij = x_i · y_j``,

    (``ρ = 0``, one ``τ``: SogCLR's GCL; ``ρ > 0`` with a ``τ_i`` per anchor: iSogCLR's
    robust loss, Qiu et al., ICML 2023, arXiv 2305.11965, eq. for RGCL). A mini-batch
    estimate of ``g_i`` inside the log is biased; the papers keep per-anchor moving
    averages ``u_i`` of it instead. On each batch, with ``ĝ_i`` the mean of
    ``exp((h_ij − h_ii)/τ_i)`` over anchor ``i``'s ``N_i`` in-batch negatives:

    ``u_i ← (1 − γ) u_i + γ ĝ_i``                                        (the state)
    ``∇_w ≈ (1/B) Σ_i τ_i / (ε + u_i) · ∇_w ĝ_i``                         (SogCLR's estimator)
    ``∂/∂τ_i ≈ log(ε + u_i) + ρ + τ_i / (ε + u_i) · ∂ĝ_i/∂τ_i``           (iSogCLR's)

    with the *updated* ``u_i`` (the papers' Algorithm 1 updates ``u`` first). Expanded,
    ``τ_i/(ε+u_i) ∇ĝ_i = (1/N_i) Σ_j [exp((h_ij − h_ii)/τ_i) / (ε+u_i)] (∇h_ij − ∇h_ii)``:
    each negative is weighted by ``exp(...)/u_i``, normalised by a *running* estimate of
    the full-data sum rather than by the batch's own sum (InfoNCE's softmax). With
    ``γ = 1, ε = 0`` the weight is the batch softmax over negatives and the gradient is
    ``τ`` times that of DCL (:func:`losses.decoupled`).

    Where ``τ`` enters: in the logits ``(h_ij − h_ii)/τ_i`` and as the factor in front of
    the log, as in the papers; so gradients are ``τ`` times those of the logit-unit
    losses of this library (InfoNCE, DCL), which have no such factor.

    Returned value: ``mean_i τ_i (log(ε + u_i) + ρ)`` with the updated ``u`` (the running
    estimate of ``F``), averaged over the two directions when ``symmetric``; its
    gradients (``x``, ``y``, ``temperature``, ``temperature_y``) are the estimators above,
    not the derivative of that value (``u`` is state: it carries no gradient).

    State in log space. ``ĝ_i`` spans ``exp(±2/τ)`` for unit embeddings: it overflows
    float32 once a negative beats the positive by ``88 τ`` (0.88 at ``τ = 0.01``). The
    state is ``log u``; the update is a ``logaddexp``, and ``log ĝ_i`` comes from the
    engine as ``logsumexp_{j≠i} s_ij − s_ii − log N_i`` (relative to the positive,
    exactly as the DCL term), so no exponential of a logit is ever formed. ``log u = −inf``
    is ``u = 0``, the papers' initial state (the first update sets ``u = γ ĝ``).

    Cost: one float32 per example per direction (``log u``), plus one per example per
    direction for individual temperatures; the caller keeps them in a data-set-sized
    array and gathers the batch's rows by example id (``log_u[ids]``) before the call,
    scattering the returned rows back after it. Compute and memory are those of the
    tiled decoupled loss (one sweep forward, one backward; ``O(B)`` vectors and a few
    tiles), with per-anchor temperatures too (the engine's per-anchor scales).

    Why this API: the state enters and leaves as arrays, so that the function stays
    pure (jit, ``shard_map``, gradient cache) and the data-set-sized store, its sharding
    and its checkpoint stay with the caller; the result is ``(loss, (log_u_x, log_u_y))``,
    the shape ``jax.value_and_grad(..., has_aux=True)`` expects. One function with a
    per-anchor ``temperature`` rather than two, since iSogCLR is SogCLR with ``τ_i``.

    Which losses take it: the softmax ones (InfoNCE both directions, NT-Xent with
    ``intra_view``; DCL is ``γ = 1``). Not the sigmoid loss: a sum of independent pair
    terms, already unbiased on a mini-batch, with no inner sum to track.

    Args:
      x: ``(B, D)`` anchors, float32 or bfloat16 (local ``(B / n, D)`` in ``shard_map``).
      y: ``(M, D)``, ``M ≥ B``: ``y[i]`` pairs with ``x[i]``, rows past ``B`` are extra
        negatives of the x anchors (as in :func:`losses.infonce`).
      log_u_x: ``(B,)`` float, ``log u`` of the x anchors (x→y direction), gathered by the
        caller from the data-set state; ``-inf`` for ``u = 0``.
      log_u_y: ``(B,)`` float, ``log u`` of the y anchors (y→x direction); needed when
        ``symmetric``, ignored (may be None) otherwise.
      gamma: ``γ ∈ (0, 1]``, the moving-average rate (a float or a traced scalar, for a
        schedule).
      temperature: ``τ``: a positive scalar (fixed or learned globally; differentiable),
        or a ``(B,)`` array of per-anchor ``τ_i`` of the x anchors (iSogCLR;
        differentiable; keep it within bounds with a projection after each update).
      temperature_y: ``(B,)`` per-anchor ``τ'_j`` of the y anchors (iSogCLR, bimodal);
        None uses ``temperature`` for both directions.
      rho: ``ρ ≥ 0``, iSogCLR's DRO radius (adds ``ρ τ_i``; keeps a learned ``τ`` from
        growing without bound). 0 for SogCLR.
      epsilon: ``ε ≥ 0`` inside ``log(ε + u)``.
      symmetric: both directions (CLIP, averaged) or x→y only.
      intra_view: same-view negatives too (SimCLR's NT-Xent, ``N_i = 2(B − 1)``); needs
        ``M = B`` and a scalar temperature.
      valid: None or bool ``(M,)``: an invalid pair is no anchor and no negative; its
        state is returned unchanged. ``N_i`` counts the valid negatives.
      block_size: tile edge; ``None`` picks one (at most 1024 rows, 512 with per-anchor
        temperatures, whose backward keeps two more tile-sized terms). Any value gives
        the same result.
      axis_name: mesh axis inside ``shard_map`` (then every array is the local shard and
        the loss is global), or None.

    Returns:
      ``(loss, (new_log_u_x, new_log_u_y))``: the scalar float32 loss (the same on every
      device) and the updated ``(B,)`` float32 states (local rows; ``new_log_u_y`` is None
      when not ``symmetric``), without gradient.

    Example:
      >>> import jax, jax.numpy as jnp, losses
      >>> x = jax.random.normal(jax.random.key(0), (256, 32))
      >>> x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
      >>> log_u = jnp.full((1000,), -jnp.inf)  # one per example of the data set
      >>> ids = jnp.arange(256)                # the batch's example ids
      >>> f = lambda x, y, u: losses.global_infonce(x, y, u, u, gamma=0.9, temperature=0.1)
      >>> (loss, (ux, uy)), (dx, dy) = jax.value_and_grad(f, (0, 1), has_aux=True)(
      ...     x, x, log_u[ids])
      >>> log_u = log_u.at[ids].set(ux)  # (and a second array for uy)
      >>> bool(jnp.isfinite(loss))
      True
    """
    p = prepare(
        x,
        y,
        _NAME,
        min_batch=2,
        block_size=block_size,
        axis_name=axis_name,
        valid=valid,
        intra_view=intra_view,
        scalars=None,
    )
    b = p.x.shape[0]
    tau_x, per_anchor = _check_temperature("temperature", temperature, b)
    tau_y, per_anchor_y = tau_x, per_anchor
    if temperature_y is not None:
        tau_y, per_anchor_y = _check_temperature("temperature_y", temperature_y, b)
        if not (per_anchor and per_anchor_y):
            raise ValueError(
                f"{_NAME}: temperature_y is for per-anchor temperatures: give temperature and "
                f"temperature_y both as ({b},) arrays, or a scalar temperature alone."
            )
    if (per_anchor or per_anchor_y) and intra_view:
        raise ValueError(
            f"{_NAME}: per-anchor temperatures need intra_view=False (a same-view logit "
            "x_i · x_k would need both anchors' temperatures); pass a scalar temperature."
        )
    if per_anchor and block_size is None:
        p = p._replace(
            row_tiling=_per_anchor_tiling(b), col_tiling=_per_anchor_tiling(p.y.shape[0])
        )
    gamma = _check_rate(gamma)
    rho = _nonnegative("rho", rho)
    eps = _nonnegative("epsilon", epsilon)
    log_u_x = _check_state("log_u_x", log_u_x, b)
    log_u_y = _check_state("log_u_y", log_u_y, b) if symmetric else None
    x, y = p.x, p.y

    # N_i: the global counts of valid candidates, minus the anchor's own positive.
    m_global = y.shape[0] * (p.global_batch // b)
    if p.valid is None:
        vx, vy = jnp.float32(p.global_batch), jnp.float32(m_global)
        anchors_x = anchors_y = jnp.ones((b,), bool)
    else:
        vx = global_sum(jnp.sum(p.valid[:b], dtype=F32), axis_name)
        vy = global_sum(jnp.sum(p.valid, dtype=F32), axis_name)
        anchors_x = anchors_y = p.valid[:b]
    n_x = vy - 1.0 + (vx - 1.0 if intra_view else 0.0)
    n_y = vx - 1.0 + (vx - 1.0 if intra_view else 0.0)
    count = anchor_count(p, axis_name)

    # One sweep, both directions: the DCL rule gives d_i = logsumexp_{j≠i} s_ij − s_ii.
    # Per-anchor temperatures enter as per-anchor scales 1/τ_i (rows) and 1/τ'_j (columns).
    rule = TileRule("logsumexp", columns=symmetric, drop_positive=True, intra_view=intra_view)
    scale = (1.0 / tau_x, 1.0 / tau_y if symmetric else None) if per_anchor else 1.0 / tau_x
    d_x, d_y = anchor_losses(
        x,
        y,
        scale=scale,
        bias=jnp.zeros((), F32),
        weights=None,
        valid=p.valid,
        ids=None,
        rule=rule,
        axis_name=axis_name,
        row_tiling=p.row_tiling,
        col_tiling=p.col_tiling,
    )

    log_eps = jnp.log(eps)  # -inf for ε = 0: log(ε + u) = log u
    rates = dict(gamma=gamma, log_eps=log_eps, rho=rho)
    terms_x, new_x = _direction(d_x, n_x, log_u_x, tau_x, active=anchors_x & (n_x > 0), **rates)
    if not symmetric:
        return global_sum(jnp.sum(terms_x) / count, axis_name), (new_x, None)
    terms_y, new_y = _direction(d_y, n_y, log_u_y, tau_y, active=anchors_y & (n_y > 0), **rates)
    partial = 0.5 * (jnp.sum(terms_x) + jnp.sum(terms_y))
    return global_sum(partial / count, axis_name), (new_x, new_y)
