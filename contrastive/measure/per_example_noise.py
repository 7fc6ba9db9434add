"""The per-example split of a batch gradient: a diagnostic of the noise scale (see
:mod:`contrastive.measure.noise_scale`, "The per-example split").

The batch gradient of a contrastive loss is an exact sum of per-example contributions
``g_B = sum_i c_i`` (:func:`per_example_grads`); the spread of ``B c_i`` over one batch is a
second estimate of ``tr(Sigma)`` (:func:`per_example_noise_scale`). It misses the cross part
of each example's influence (the module docstring of :mod:`contrastive.measure.noise_scale`
says why), so the meter and :func:`contrastive.run.noise_meter.measure_checkpoint` use
the fixed-batch estimator; this one is kept as a diagnostic whose exact sum is tested.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from contrastive.measure.noise_scale import make_gradient_fn, sq_norm, wide_dtype

__all__ = ["PerExampleEstimate", "per_example_grads", "per_example_noise_scale"]


class PerExampleEstimate(NamedTuple):
    """One batch's per-example measurement (see :func:`per_example_noise_scale`)."""

    batch_size: int
    sq_dev_sum: float  # sum_i |B c_i - g_B|^2
    batch_sq_norm: float  # |g_B|^2

    @property
    def trace(self) -> float:
        """``tr(Sigma) ~ sum_i |B c_i - g_B|^2 / (B - 1)``."""
        return self.sq_dev_sum / (self.batch_size - 1)

    @property
    def variance(self) -> float:
        """``V ~ tr(Sigma) / B``: comparable with :attr:`NoiseEstimate.variance`."""
        return self.trace / self.batch_size

    @property
    def g2(self) -> float:
        """``|G|^2 ~ |g_B|^2 - tr(Sigma) / B``."""
        return self.batch_sq_norm - self.variance

    @property
    def b_simple(self) -> float:
        return self.trace / self.g2 if self.g2 != 0 else math.nan


def _per_example_parts(params, batch, *, graphdef, config, axis_name, devices):
    """Inside ``shard_map`` (or whole with ``axis_name=None``): ``contrib(rows) -> [c, ...]``
    per-example contributions of the local rows ``rows = (x, y, dL/dx, dL/dy)``, and the local
    ``(x, y, dL/dx, dL/dy)`` themselves."""
    from contrastive.step import gradcache
    from contrastive.step.step_loss import make_loss_fn
    from contrastive.step.train_step import tower_fns
    from contrastive.step_configs import local_chunk_size

    towers = tower_fns(graphdef)
    loss_fn = make_loss_fn(graphdef, config.loss, axis_name, batch.ids, batch.valid)
    chunk = local_chunk_size(config.chunk_size, devices)
    frozen = lax.stop_gradient(params)
    inputs = (batch.x, batch.y)
    if chunk is None:
        emb = tuple(f(frozen, a, None) for f, a in zip(towers, inputs, strict=True))
    else:  # the gradient cache's chunks: the same embeddings, one chunk's activations alive
        emb = gradcache.encode_towers_in_chunks(towers, frozen, inputs, None, chunk_size=chunk)
    emb = lax.stop_gradient(emb)
    # The full-batch loss (the ring across devices): dL/d(temperature, bias) and dL/d(emb).
    _, (g_loss, (gx, gy)) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, emb)
    b_local = jax.tree_util.tree_leaves(batch.x)[0].shape[0]
    total = b_local * devices
    if axis_name is not None:  # every device holds its share of the temperature's gradient
        g_loss = lax.psum(g_loss, axis_name)
    # The temperature and bias terms, split evenly over the B examples.
    share = jax.tree_util.tree_map(lambda g: g.astype(wide_dtype(g.dtype)) / total, g_loss)

    def contrib(xs, ys, gxs, gys):
        def one(xi, yi, gxi, gyi):
            add1 = lambda a: jax.tree_util.tree_map(lambda v: v[None], a)
            _, vjp_x = jax.vjp(lambda p: towers[0](p, add1(xi), None), params)
            _, vjp_y = jax.vjp(lambda p: towers[1](p, add1(yi), None), params)
            (px,), (py,) = vjp_x(gxi[None]), vjp_y(gyi[None])
            return jax.tree_util.tree_map(
                lambda a, b, s: a.astype(s.dtype) + b.astype(s.dtype) + s, px, py, share
            )

        return jax.vmap(one)(xs, ys, gxs, gys)

    return contrib, (batch.x, batch.y, gx, gy), b_local


def _check_pairs(batch: Any) -> None:
    bx = jax.tree_util.tree_leaves(batch.x)[0].shape[0]
    by = jax.tree_util.tree_leaves(batch.y)[0].shape[0]
    if bx != by:
        raise ValueError(
            f"the per-example split needs y with as many rows as x ({bx}), got {by}: extra "
            "negatives belong to no example; use the fixed-batch estimator"
        )


def per_example_grads(params: Any, batch: Any, *, graphdef: Any, config: Any, mesh: Mesh) -> Any:
    """The per-example contributions ``c_i`` of the batch gradient: a pytree like ``params``
    with a leading axis of ``B`` rows (sharded over the data axis), ``sum_i c_i = g_B``.

    ``c_i = J_x(x_i)^T dL/dx_i + J_y(y_i)^T dL/dy_i + (1/B) dL/d(temperature, bias)``, where
    ``J`` are example ``i``'s own towers' Jacobians and ``dL/dy_i`` holds its gradient as the
    positive of ``x_i`` and as a negative of every other anchor (likewise ``dL/dx_i`` for a
    symmetric loss). The loss gradient is the train step's (ring over the mesh, embeddings in
    the gradient cache's chunks when ``config.chunk_size`` is set), so the sum equals
    :func:`make_gradient_fn`'s gradient up to float rounding. No dropout. Holds ``B`` copies
    of the parameters: for tests and small models; :func:`per_example_noise_scale` reduces
    chunk by chunk instead. Refuses extra negatives (``y`` longer than ``x``).
    """
    from contrastive.mesh import DATA_AXIS, mark_varying
    from contrastive.step.train_step import as_batch

    batch = as_batch(batch)
    _check_pairs(batch)
    n = mesh.shape[DATA_AXIS]

    def local(params, batch):
        params = mark_varying(params)
        contrib, rows, _ = _per_example_parts(
            params, batch, graphdef=graphdef, config=config, axis_name=DATA_AXIS, devices=n
        )
        return contrib(*rows)

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
            out_specs=PartitionSpec(DATA_AXIS),
        )
    )(params, batch)


def per_example_noise_scale(
    params: Any,
    batch: Any,
    *,
    graphdef: Any,
    config: Any,
    mesh: Mesh,
    rows_per_pass: int | None = None,
) -> PerExampleEstimate:
    """``tr(Sigma)``, ``|G|^2`` and ``B_simple`` from the spread of ``B c_i`` over one batch.

    Two passes: the batch gradient ``g_B`` (:func:`make_gradient_fn`), then the per-example
    contributions ``c_i`` (:func:`per_example_grads`'s split) ``rows_per_pass`` rows per
    device at a time (default: the gradient cache's chunk, or all local rows), each reduced
    at once to ``|B c_i - g_B|^2`` in float32 (the deviation from a known mean: no
    cancellation). ``tr(Sigma) = sum_i |B c_i - g_B|^2 / (B - 1)``,
    ``|G|^2 = |g_B|^2 - tr(Sigma) / B``. Cost: about two batch gradients.

    Biased for contrastive losses: the split leaves out how example ``i`` changes the other
    examples' embedding gradients (its role as their negative), an ``O(1)`` error (20-35 %
    high on a small InfoNCE model at every B from 32 to 512; module docstring). Use
    :func:`fixed_batch_noise_scale` for B_simple; this is a diagnostic.
    """
    from contrastive.mesh import DATA_AXIS, mark_varying
    from contrastive.step.train_step import as_batch
    from contrastive.step_configs import local_chunk_size

    batch = as_batch(batch)
    _check_pairs(batch)
    n = mesh.shape[DATA_AXIS]
    total = jax.tree_util.tree_leaves(batch.x)[0].shape[0]
    b_local = total // n
    c = rows_per_pass or local_chunk_size(config.chunk_size, n) or b_local
    if isinstance(c, bool) or not isinstance(c, int) or c < 1 or b_local % c:
        raise ValueError(
            f"rows_per_pass {c!r} must be a positive divisor of the {b_local} rows per device"
        )
    g_batch = make_gradient_fn(graphdef, config, mesh)(params, batch)

    def local(params, batch, g_ref):
        params = mark_varying(params)
        contrib, rows, _ = _per_example_parts(
            params, batch, graphdef=graphdef, config=config, axis_name=DATA_AXIS, devices=n
        )
        split = jax.tree_util.tree_map(lambda a: a.reshape(b_local // c, c, *a.shape[1:]), rows)

        def dev(part):
            ci = contrib(*part)  # [c, ...] per leaf
            d = jax.tree_util.tree_map(lambda a, g: total * a - g.astype(a.dtype)[None], ci, g_ref)
            return jnp.sum(jax.vmap(sq_norm)(d))

        return lax.psum(jnp.sum(lax.map(dev, split)), DATA_AXIS)

    sq_dev = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS), PartitionSpec()),
            out_specs=PartitionSpec(),
        )
    )(params, batch, g_batch)
    return PerExampleEstimate(total, float(sq_dev), float(sq_norm(g_batch)))
