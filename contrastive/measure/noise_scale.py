"""The gradient noise scale B_simple of a contrastive run, measured at the run's own batch size.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv
1812.06162), Section 2.2 and Appendix A. With ``G`` the true gradient and ``g_B`` the gradient
of a batch of ``B`` examples, ``E g_B = G`` and ``Cov g_B = Sigma / B`` for a loss that is a
mean of independent per-example terms; the *simple noise scale*

    B_simple = tr(Sigma) / |G|^2

predicts the critical batch size: below it doubling the batch nearly halves the steps to a
target, above it it barely helps.

Why not the two-size estimator of their Appendix A.1. It takes ``|g_b|^2`` at two sizes and
solves ``E|g_b|^2 = |G|^2 + tr(Sigma)/b`` for the two unknowns. A contrastive loss is a
different *function* at each batch size (InfoNCE's log-partition sums ``B`` negatives, the
sigmoid loss ``B`` pairs per row), so ``E g_b`` itself moves with ``b``; the difference
``|g_b|^2 - |g_B|^2``, multiplied by ``~b`` to give ``tr(Sigma)``, then carries that shift
(it gave negative traces for InfoNCE and 5x swings with ``B`` for DCL). This module measures
only at one size, the run's own ``B``:

**The fixed-batch estimator** (:func:`fixed_batch_noise_scale`, McCandlish et al. 2018,
Appendix A, "estimate the variance of the gradient directly"): draw ``m`` independent batches
of size ``B`` at fixed parameters, take each one's full gradient ``g_j`` (what the run's step
computes, before clipping: both towers, temperature, bias), and with ``gbar = (1/m) sum_j g_j``

    V        = sum_j |g_j - gbar|^2 / (m - 1)         unbiased for tr Cov(g_B)
    |G|^2    = |gbar|^2 - V / m                        unbiased for |E g_B|^2
    B_simple = B V / |G|^2                             (B V estimates tr(Sigma))

This needs no model of how the loss depends on ``B``: ``V`` is the variance of the gradient
the run actually follows and ``E g_B`` the direction it actually descends, at that ``B``. For
a contrastive loss ``B V = A + C / B + ...`` (a Hoeffding decomposition of the batch's
U-statistic-like gradient: ``A`` the per-example part, ``C`` the pair part), so ``B V`` is
constant in ``B`` up to ``O(1/B)``, the check ``tests/test_noise_scale.py`` makes at
``B/4, B, 4B``. Ratios of noisy estimates are biased (``E[X/Y] != E X / E Y``, and one
``|G|^2`` can be near zero): average ``B V`` and ``|G|^2`` over checkpoints and seeds first
and divide once (:func:`combine`). ``V`` is accumulated by Welford's update in float32 (the
gradients' own dtype may be bfloat16), never as ``mean |g_j|^2 - |gbar|^2`` (a difference of
nearly equal numbers when the noise is small); its ``m - 1`` terms (Helmert contrasts, each
with mean ``V``, uncorrelated) give its standard error. Cost: ``m`` extra gradient
computations of batch ``B`` per measurement (each through the run's own machinery: gradient
cache, ring, one reduction across devices each), no parameter update.

**The per-example estimator**
(:func:`~contrastive.measure.per_example_noise.per_example_noise_scale`): one batch, split
into per-example contributions ``c_i`` with ``sum_i c_i = g_B`` exactly
(:func:`~contrastive.measure.per_example_noise.per_example_grads`): example ``i``'s two
embedding gradients ``dL/dx_i``,
``dL/dy_i`` (which include its role as a negative of every other anchor) pulled back through
its own towers, plus ``1/B`` of the temperature's and bias's gradient. ``B c_i`` is meant to
play the role of a per-example gradient, and

    tr(Sigma)_pe = sum_i |B c_i - g_B|^2 / (B - 1),    |G|^2_pe = |g_B|^2 - tr(Sigma)_pe / B.

It costs one batch gradient plus one per-row pull-back pass (``B`` per-example parameter
gradients, one chunk at a time) instead of ``m`` batch gradients. It needs towers that embed
each row on its own (no batch statistics: LayerNorm, not BatchNorm), no dropout, ``y``
without extra negatives and no negative queue (extra negatives belong to no example).

**It does not agree with the fixed-batch estimator, and nothing here uses it for B_simple.**
The split gives each pair term's gradient to the example whose embedding it flows through.
But example ``i`` also changes the *other* examples' embedding gradients (as a candidate in
anchor ``k``'s softmax it shifts ``dL/dx_k``, which is pulled back through ``k``'s towers),
and that part of its influence on ``g_B`` lands in the ``c_k`` of the others. With
``a_i = B c_i - G`` and ``b_i`` that cross part, ``Cov g_B ~ Cov(a + b) / B`` (the Hoeffding
projection of the batch gradient), while the spread of ``B c_i`` estimates ``Cov(a) / B``:
the error is ``O(1)``, not the ``O(1/B)`` of a finite batch, and can have either sign
(``Cov(a + b) = Cov(a) + 2 Cov(a, b) + Cov(b)``). Measured on
a small InfoNCE checkpoint (MLP towers, D = 8; ``tests/test_noise_scale.py``'s set-up) the
per-example ``tr(Sigma)`` was 20-35 % above the fixed-batch ``B V`` at every ``B`` from 32
to 512 (539 against 414 +- 14 at 32, 583 against 433 +- 13 at 512), while a jackknife over
single batches of 64, which does include the cross part, agreed with the fixed-batch value
(405 +- 25 against 427 +- 13; the per-example estimate 511 +- 25). They agree only where
the cross part is negligible (a loss without negatives); the split is kept as a diagnostic
whose exact sum is tested, and the meter and
:func:`~contrastive.run.noise_meter.measure_checkpoint` use the fixed-batch
estimator.

Example, at a checkpoint of a run (its own batches, no update)::

    # measure_checkpoint: contrastive.run.noise_meter; cfg: the run's Config
    est = measure_checkpoint(cfg, num_batches=32)
    est.b_simple, est.variance, est.g2, est.variance_se
    combine([est_seed0, est_seed1, est_seed2]).b_simple  # averaged before dividing
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

__all__ = [
    "NoiseEstimate",
    "CombinedNoiseScale",
    "sq_norm",
    "wide_dtype",
    "fixed_batch_noise_scale",
    "combine",
    "make_gradient_fn",
]


def wide_dtype(dtype: Any) -> jnp.dtype:
    """float32 at least: squares of bfloat16 gradients summed in bfloat16 would lose digits."""
    return jnp.promote_types(jnp.result_type(dtype), jnp.float32)


def sq_norm(tree: Any) -> jax.Array:
    """``sum over leaves of sum(g^2)``, each square and sum in float32 or wider.

    >>> float(sq_norm({"a": jnp.ones(3, jnp.bfloat16), "b": jnp.full((2,), 2.0)}))
    11.0
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.float32(0)
    parts = [jnp.sum(jnp.square(g.astype(wide_dtype(g.dtype)))) for g in leaves]
    return sum(parts[1:], parts[0])


# ------------------------------------------------------------------- the fixed-batch estimate


class NoiseEstimate(NamedTuple):
    """One fixed-batch measurement: ``m`` gradients of batches of ``batch_size`` rows.

    The raw sums (``sq_dev_sum = sum_j |g_j - gbar|^2``, ``mean_sq_norm = |gbar|^2``,
    ``terms``: the ``m - 1`` Helmert terms that sum to ``sq_dev_sum``) are kept so that
    callers can average before dividing (:func:`combine`). Host floats (float64).
    """

    batch_size: int
    num_batches: int
    sq_dev_sum: float
    mean_sq_norm: float
    terms: tuple[float, ...]

    @property
    def variance(self) -> float:
        """``V = sum_j |g_j - gbar|^2 / (m - 1)``: tr Cov(g_B), unbiased."""
        return self.sq_dev_sum / (self.num_batches - 1)

    @property
    def variance_se(self) -> float:
        """Standard error of ``V``: the spread of its ``m - 1`` uncorrelated Helmert terms
        (each with mean ``V``) over ``sqrt(m - 1)``; NaN for ``m = 2``."""
        t = np.asarray(self.terms, np.float64)
        if t.size < 2:
            return math.nan
        return float(np.std(t, ddof=1) / math.sqrt(t.size))

    @property
    def g2(self) -> float:
        """``|G|^2 = |gbar|^2 - V / m``: the squared norm of the expected gradient, unbiased."""
        return self.mean_sq_norm - self.variance / self.num_batches

    @property
    def trace(self) -> float:
        """``tr(Sigma) ~ B V``."""
        return self.batch_size * self.variance

    @property
    def b_simple(self) -> float:
        """``B_simple = B V / |G|^2`` of this one measurement (see :func:`combine`)."""
        return self.trace / self.g2 if self.g2 != 0 else math.nan


class CombinedNoiseScale(NamedTuple):
    """Means of ``tr(Sigma) = B V`` and ``|G|^2`` over measurements, and their ratio."""

    trace: float
    g2: float
    b_simple: float
    count: int


def combine(estimates: Sequence[NoiseEstimate]) -> CombinedNoiseScale:
    """Average ``B V`` and ``|G|^2`` over measurements (checkpoints, seeds), then divide.

    ``b_simple = mean_k(B_k V_k) / mean_k(|G|^2_k)``: the ratio of the means converges to
    ``tr(Sigma) / |G|^2``; the mean of per-measurement ratios does not (each ratio is
    biased, and unbounded where one ``|G|^2`` is near zero).

    >>> e = NoiseEstimate(8, 3, 2.0, 1.5, (1.0, 1.0))
    >>> round(combine([e, e._replace(mean_sq_norm=3.5)]).b_simple, 6)  # 8 / ((1.17 + 3.17) / 2)
    3.692308
    """
    if not len(estimates):
        raise ValueError("combine needs at least one NoiseEstimate")
    trace = float(np.mean([e.trace for e in estimates]))
    g2 = float(np.mean([e.g2 for e in estimates]))
    return CombinedNoiseScale(trace, g2, trace / g2 if g2 != 0 else math.nan, len(estimates))


@jax.jit
def _welford(mean: Any, g: Any, k: jax.Array) -> tuple[Any, jax.Array]:
    """One Welford step with the ``k``-th gradient (k = 1, 2, ...): the new mean, and the
    Helmert term ``(k-1)/k |g - mean_{k-1}|^2`` (each has mean V; they sum to
    ``sum_j |g_j - gbar|^2``), all in float32 or wider."""
    delta = jax.tree_util.tree_map(lambda a, m: a.astype(m.dtype) - m, g, mean)
    new = jax.tree_util.tree_map(lambda m, d: m + d / k.astype(m.dtype), mean, delta)
    return new, (k - 1) / k * sq_norm(delta)


def fixed_batch_noise_scale(
    grad_fn: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    batch_size: int,
    num_batches: int,
) -> NoiseEstimate:
    """``V``, ``|G|^2`` and ``B_simple`` at one batch size from ``m`` independent batches.

    McCandlish et al. 2018, Appendix A (see the module docstring for the formulas).

    Args:
      grad_fn: ``grad_fn(batch) -> gradient pytree`` at fixed parameters (no update): the
        full gradient the run's step takes before clipping, e.g. ``lambda b: f(params, b)``
        with ``f`` from :func:`make_gradient_fn`. Any float dtype; accumulated in float32
        or wider.
      batches: yields at least ``num_batches`` independent batches of ``batch_size`` rows
        (only the first ``num_batches`` are read; one at a time).
      batch_size: ``B``, the rows of each batch (``B_simple = B V / |G|^2``).
      num_batches: ``m >= 2`` (32 or more for a standard error of ``V`` near 25 %).

    Returns:
      A :class:`NoiseEstimate` (``.variance``, ``.g2``, ``.b_simple``, ``.variance_se``, and
      the raw sums for :func:`combine`).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an integer >= 2, got {num_batches!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    mean, terms = None, []
    it = iter(batches)
    for k in range(1, num_batches + 1):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(
                f"batches gave {k - 1} batches but num_batches={num_batches}: pass more batches "
                "or a smaller num_batches"
            ) from None
        g = grad_fn(batch)
        if mean is None:
            mean = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, wide_dtype(a.dtype)), g)
        mean, term = _welford(mean, g, jnp.float32(k))
        if k > 1:
            terms.append(term)
    terms_host = tuple(float(t) for t in jax.device_get(terms))
    # The m - 1 Helmert terms summed in float64 on the host.
    sq_dev = float(math.fsum(terms_host))
    return NoiseEstimate(batch_size, num_batches, sq_dev, float(sq_norm(mean)), terms_host)


def make_gradient_fn(graphdef: Any, config: Any, mesh: Mesh) -> Callable[..., Any]:
    """``grad(params, batch, key=None, queue=None) -> grads``: the train step's gradient.

    Exactly what :func:`contrastive.step.train_step.train_step` differentiates
    (:func:`contrastive.step.train_step.loss_and_grads`: the gradient cache when
    ``config.chunk_size`` is set, the ring across the mesh's devices, one reduction across
    devices), before clipping and without an update, jitted. ``batch`` is sharded as for the
    step (:func:`contrastive.mesh.shard_batch`); ``key`` drives dropout as the step's key
    does (None: none); ``queue``: the state's negative queue (its rows are extra negatives;
    nothing is pushed).
    """
    from contrastive.step.train_step import as_batch, loss_and_grads

    def grad(params, batch, key, queue):
        out = loss_and_grads(
            params, as_batch(batch), key, graphdef=graphdef, config=config, mesh=mesh, queue=queue
        )
        return out[1]

    jitted = jax.jit(grad)

    def call(params: Any, batch: Any, key: jax.Array | None = None, queue: Any = None) -> Any:
        return jitted(params, batch, key, queue)

    return call
