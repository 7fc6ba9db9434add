"""The gradient noise scale B_simple (McCandlish et al. 2018), measured from two batch sizes.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162), Section 2.2 and Appendix A. Let ``G`` be the true gradient of the
loss and ``Sigma`` the covariance of a per-example gradient. The gradient of a batch of
``B`` independent examples, ``G_B``, has

    E |G_B|^2 = |G|^2 + tr(Sigma) / B.

The *simple noise scale* ``B_simple = tr(Sigma) / |G|^2`` predicts the critical batch
size: below it, doubling the batch nearly halves the steps to a target; above it, it
barely helps. Two measured squared norms, ``|G_small|^2`` at ``b_small`` and
``|G_big|^2`` at ``b_big > b_small``, solve the two equations for the unknowns:

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Both are unbiased when the inputs are. Their ratio is not (E[X/Y] != E[X]/E[Y], and a
single |G|^2 estimate is often near zero or negative when the noise dominates), so the
two estimates are averaged over many measurements first -- a running mean or an
exponential moving average, :class:`NoiseScaleMeter` -- and only then divided.

Where the two sizes come from, :func:`measure_sq_norms`: one batch of ``B`` rows is cut
into ``k`` sub-batches of ``B/k``; ``|G_small|^2`` is the mean over the sub-batches of
the squared norm of each sub-batch's gradient, and ``|G_big|^2`` the squared norm of the
gradient at ``B``. One measurement is noisy; the meter averages many.

Contrastive losses. The formula ``E|G_B|^2 = |G|^2 + tr(Sigma)/B`` assumes a mean of
independent per-example terms. A contrastive loss is not one: each row's term depends on
the other rows (its negatives), so the loss at batch ``b`` is a different function from
the loss at ``B`` (InfoNCE's log-partition grows with the number of negatives, the
sigmoid loss sums ``B`` negatives per row), and the big-batch gradient is *not* the mean
of the sub-batch gradients. :func:`measure_sq_norms` therefore (default
``big_batch="full"``) computes each small gradient on its sub-batch **alone**, with only
that sub-batch's negatives -- what a run at batch ``B/k`` computes -- and the big one on the
full batch. ``B_simple`` then measures the noise of the loss as it is actually trained at
those two sizes. It includes an **objective-shift bias**: with ``G_b`` the expected
gradient of the size-``b`` loss, ``E|G_small|^2 - E|G_big|^2`` also contains
``|G_b|^2 - |G_B|^2``, the change of the loss itself with the batch size, which the
formula attributes to noise (it can have either sign). The negatives also make the
per-row terms dependent, so the variance is only approximately ``tr(Sigma)/B``. Keep
``B/k`` large enough that the loss changes little between the two sizes (e.g. per-device
batches of hundreds), and read ``B_simple`` as a measure of *this* training set-up, not of
an i.i.d. noise scale. ``big_batch="mean_of_splits"`` (the mean of the sub-batch gradients
as the big gradient: no extra gradient, exact only for per-example-mean losses) is for
losses that are independent over rows.

Example::

    grad_fn = jax.grad(loss)                                  # (params, batch) -> grads
    meter = NoiseScaleMeter.init()
    for batch in batches:                                     # B = 256 rows each
        small, big = measure_sq_norms(grad_fn, params, batch, num_splits=8)
        meter = meter.update(small, 32, big, 256, decay=0.95)
    meter.b_simple()                                          # tr(Sigma) / |G|^2

In the sharded training loop, :func:`make_noise_probe` gives ``|G_small|^2`` from every
device's rows alone, and the step's own ``grad_norm ** 2`` is ``|G_big|^2`` at ``B``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "NoiseScale",
    "NoiseScaleMeter",
    "noise_scale_estimates",
    "measure_sq_norms",
    "noise_scale_from_grads",
    "sq_norm",
    "make_noise_probe",
]


def _check_sizes(b_small: Any, b_big: Any) -> None:
    for name, b in (("b_small", b_small), ("b_big", b_big)):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise ValueError(
                f"{name} must be a Python number (a batch size known when tracing), got "
                f"{type(b).__name__}"
            )
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"{name} must be a positive batch size, got {b}")
    if not b_small < b_big:
        raise ValueError(
            f"b_small={b_small} must be smaller than b_big={b_big}: pass the sub-batch size "
            "first and the full batch size second"
        )


def noise_scale_estimates(
    sq_norm_small: Any, b_small: float, sq_norm_big: Any, b_big: float
) -> tuple[Any, Any]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes.

    With ``E|G_b|^2 = |G|^2 + tr(Sigma)/b`` at ``b = b_small`` and ``b = b_big``:

        |G|^2     = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)

    (McCandlish et al. 2018, Appendix A.1). The norms may be Python floats, NumPy or JAX
    arrays (any shape, elementwise; traced inside ``jit``); the sizes must be Python
    numbers with ``0 < b_small < b_big``. One measurement can give a negative ``|G|^2``:
    average many (:class:`NoiseScaleMeter`) before taking ``tr(Sigma) / |G|^2``.

    Example::

        >>> g2, tr = noise_scale_estimates(1.0 + 4.0 / 8, 8, 1.0 + 4.0 / 64, 64)
        >>> round(g2, 12), round(tr, 12)
        (1.0, 4.0)
    """
    _check_sizes(b_small, b_big)
    g2 = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScale(NamedTuple):
    """``g2 = |G|^2``, ``trace = tr(Sigma)``, ``b_simple = trace / g2`` (float32 scalars)."""

    g2: jax.Array
    trace: jax.Array
    b_simple: jax.Array


class NoiseScaleMeter(NamedTuple):
    """Running averages of the two estimates: a pytree of scalars, usable inside ``jit``.

    Each :meth:`update` adds one measurement's ``(|G|^2, tr(Sigma))`` estimates:
    ``sum <- decay * sum + estimate`` and ``weight <- decay * weight + 1``, so the average
    ``sum / weight`` is the plain mean of all measurements for ``decay=1`` and a
    bias-corrected exponential moving average for ``decay < 1`` (the first updates are not
    pulled towards the zero start). :meth:`b_simple` divides the *averages*: the ratio of
    two noisy estimates is biased, the ratio of their averages converges.

    The state is immutable; ``update`` returns a new meter (carry it like an optimiser
    state, e.g. in a ``lax.scan`` or next to the train state).
    """

    g2_sum: jax.Array
    trace_sum: jax.Array
    weight: jax.Array
    count: jax.Array  # int32: measurements so far

    @classmethod
    def init(cls) -> NoiseScaleMeter:
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, zero, jnp.zeros((), jnp.int32))

    def update(
        self,
        sq_norm_small: Any,
        b_small: float,
        sq_norm_big: Any,
        b_big: float,
        *,
        decay: float = 1.0,
    ) -> NoiseScaleMeter:
        """Add one measurement (scalars; see :func:`noise_scale_estimates`).

        ``decay`` in (0, 1]: 1 averages all measurements equally; 0.9 weights the last
        ~10 most (an EMA, for a noise scale that drifts as training goes on).
        """
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay <= 1:
            raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
        g2, trace = noise_scale_estimates(
            jnp.asarray(sq_norm_small, jnp.float32),
            b_small,
            jnp.asarray(sq_norm_big, jnp.float32),
            b_big,
        )
        if g2.shape != ():
            raise ValueError(f"update takes scalar squared norms, got shape {g2.shape}")
        return NoiseScaleMeter(
            decay * self.g2_sum + g2,
            decay * self.trace_sum + trace,
            decay * self.weight + 1.0,
            self.count + 1,
        )

    def estimates(self) -> tuple[jax.Array, jax.Array]:
        """Averaged ``(|G|^2, tr(Sigma))``; NaN before the first update."""
        w = jnp.where(self.weight > 0, self.weight, jnp.nan)
        return self.g2_sum / w, self.trace_sum / w

    def b_simple(self) -> jax.Array:
        """``B_simple = tr(Sigma) / |G|^2`` of the averages; NaN before the first update.

        Negative or huge while the averaged ``|G|^2`` is still within its noise of zero:
        average more measurements (or a larger ``b_big``) before reading it.
        """
        g2, trace = self.estimates()
        return trace / g2

    def result(self) -> NoiseScale:
        """The averaged ``(g2, trace, b_simple)`` in one :class:`NoiseScale`."""
        g2, trace = self.estimates()
        return NoiseScale(g2, trace, trace / g2)


def sq_norm(tree: Any) -> jax.Array:
    """``sum over leaves of sum(g^2)``, accumulated in float32: the squared global norm."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves), jnp.float32(0))


def _rows(batch: Any) -> int:
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree_util.tree_leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        found = ", ".join(sorted(map(str, sizes))) or "none"
        raise ValueError(
            f"every batch array needs the same leading (row) axis, got sizes {found}: split "
            "extra negatives off and pass rows that pair up"
        )
    return sizes.pop()


def measure_sq_norms(
    grad_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    *,
    num_splits: int,
    big_batch: Literal["full", "mean_of_splits"] = "full",
) -> tuple[jax.Array, jax.Array]:
    """``(|G_small|^2, |G_big|^2)`` at ``b_small = B / num_splits`` and ``b_big = B``.

    ``batch``: a pytree whose leaves all have ``B`` rows; it is cut into ``k =
    num_splits`` contiguous sub-batches of ``B/k`` rows (shuffle the rows first if their
    order is not random). ``grad_fn(params, sub_batch) -> grads`` is the gradient of the
    *mean* loss over the rows it is given.

    - ``|G_small|^2 = (1/k) sum_i |grad_fn(params, sub_i)|^2``: each sub-batch alone (for a
      contrastive loss: with its own negatives only, as a run at ``B/k`` sees it);
    - ``big_batch="full"``: ``|G_big|^2 = |grad_fn(params, batch)|^2``, one more gradient,
      valid for any loss (contrastive losses included; see the module docstring for the
      objective-shift bias this then measures);
    - ``big_batch="mean_of_splits"``: ``|G_big|^2 = |(1/k) sum_i grad_fn(params, sub_i)|^2``,
      no extra gradient; equal to ``"full"`` only when the loss is a mean of independent
      per-row terms (not for contrastive losses).

    The sub-batches run one at a time (``lax.scan``: one sub-batch's activations alive);
    squares accumulate in float32. Jit-compatible; pass the result and ``B/k``, ``B`` to
    :meth:`NoiseScaleMeter.update`.
    """
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 2:
        raise ValueError(f"num_splits must be an integer >= 2, got {num_splits!r}")
    if big_batch not in ("full", "mean_of_splits"):
        raise ValueError(f"big_batch must be 'full' or 'mean_of_splits', got {big_batch!r}")
    rows = _rows(batch)
    if rows % num_splits:
        raise ValueError(
            f"a batch of {rows} rows does not split into {num_splits} equal sub-batches: use a "
            f"num_splits that divides {rows}"
        )
    k = num_splits
    subs = jax.tree_util.tree_map(lambda a: a.reshape(k, rows // k, *a.shape[1:]), batch)
    first = jax.tree_util.tree_map(lambda a: a[0], subs)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    keep_sum = big_batch == "mean_of_splits"

    def body(carry, sub):
        total_sq, total_g = carry
        g = grad_fn(params, sub)
        if keep_sum:
            total_g = jax.tree_util.tree_map(lambda t, a: t + a.astype(jnp.float32), total_g, g)
        return (total_sq + sq_norm(g), total_g), None

    (total_sq, total_g), _ = jax.lax.scan(body, (jnp.float32(0), zeros if keep_sum else None), subs)
    small = total_sq / k
    if keep_sum:
        big = sq_norm(jax.tree_util.tree_map(lambda t: t / k, total_g))
    else:
        big = sq_norm(grad_fn(params, batch))
    return small, big


def noise_scale_from_grads(
    g_small_list: Sequence[Any], g_big: Any, *, b_small: float, b_big: float | None = None
) -> NoiseScale:
    """One measurement's ``(|G|^2, tr(Sigma), B_simple)`` from gradients already computed.

    ``g_small_list``: the gradient pytrees of ``k >= 1`` batches of ``b_small`` rows each;
    ``g_big``: a gradient at ``b_big`` rows (default ``k * b_small``: the batch those
    sub-batches make up). ``|G_small|^2`` is the mean of their squared norms. The ratio of
    a single measurement is biased and noisy; feed many into :class:`NoiseScaleMeter`
    (this returns its ``g2`` and ``trace`` as well, for that).

    Example (the per-device gradients before the all-reduce as the small batches, each
    computed on its device's rows alone)::

        est = noise_scale_from_grads(per_device_grads, global_grads, b_small=B // n)
    """
    if not len(g_small_list):
        raise ValueError("g_small_list is empty: pass the gradients of at least one sub-batch")
    b_big = b_small * len(g_small_list) if b_big is None else b_big
    small = sum(sq_norm(g) for g in g_small_list) / len(g_small_list)
    g2, trace = noise_scale_estimates(small, b_small, sq_norm(g_big), b_big)
    return NoiseScale(g2, trace, trace / g2)


def make_noise_probe(
    graphdef: Any, config: Any, mesh: jax.sharding.Mesh, *, splits_per_device: int = 1
) -> Callable[[Any, Any], jax.Array]:
    """``probe(params, batch) -> |G_small|^2`` of the sharded train step's batch.

    For the training loop: every device cuts its ``B/n`` rows of the global batch into
    ``splits_per_device`` sub-batches and takes the gradient of the configured contrastive
    loss of each sub-batch **alone** (:func:`contrastive.train_step.local_loss_and_grads`
    with no axis: its own negatives only, no ring); the result is the mean of their squared
    norms over all ``n * splits_per_device`` sub-batches, at ``b_small = B / (n *
    splits_per_device)``. The matching ``|G_big|^2`` at ``b_big = B`` is the step's own
    ``grad_norm ** 2`` (the gradient before clipping) at the same parameters, so call the
    probe *before* the step (which donates the state). One extra gradient pass, no
    cross-device traffic but one scalar ``pmean``. No dropout (the probe's gradients are
    deterministic). Gradient caching, when configured, runs on each sub-batch with a chunk
    of at most ``chunk_size / n`` rows (the step's per-device chunk); the gradient is the
    same with or without it.

    ``batch``: a :class:`~contrastive.train_step.Batch` (or ``(x, y[, ids])``) sharded over
    the data axis as for the step. With ``splits_per_device > 1`` every leaf must have
    ``B`` rows (no extra negatives).
    """
    import dataclasses

    from jax.sharding import PartitionSpec

    from contrastive.mesh import DATA_AXIS
    from contrastive.train_step import as_batch, local_loss_and_grads

    s = splits_per_device
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"splits_per_device must be a positive integer, got {s!r}")
    n = mesh.shape[DATA_AXIS]

    def local(params, batch):
        # Varying first: a gradient of the replicated parameters would be all-reduced
        # across devices by the transpose, mixing the sub-batches (see train_step).
        params = jax.tree_util.tree_map(lambda p: jax.lax.pcast(p, DATA_AXIS, to="varying"), params)
        rows = _rows(batch) if s > 1 else jax.tree_util.tree_leaves(batch)[0].shape[0]
        sub_rows = rows // s
        cfg = config
        if config.chunk_size is not None:
            chunk = min(max(config.chunk_size // n, 1), sub_rows)
            cfg = dataclasses.replace(config, chunk_size=chunk)
        subs = jax.tree_util.tree_map(lambda a: a.reshape(s, sub_rows, *a.shape[1:]), batch)

        def one(sub):
            _, grads = local_loss_and_grads(
                params, sub, None, graphdef=graphdef, config=cfg, axis_name=None
            )
            return sq_norm(grads)

        return jax.lax.pmean(jnp.mean(jax.lax.map(one, subs)), DATA_AXIS)

    def probe(params, batch):
        batch = as_batch(batch)
        rows = _rows(batch.x)
        if rows % (n * s):
            raise ValueError(
                f"a batch of {rows} rows does not split into {n} devices x {s} sub-batches: "
                f"use a batch size that is a multiple of {n * s}"
            )
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
            out_specs=PartitionSpec(),
        )(params, batch)

    return jax.jit(probe)
