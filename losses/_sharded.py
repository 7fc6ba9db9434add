"""Calling the ring losses on globally sharded arrays from ordinary ``jax.jit`` code."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"  # the mesh axis the batch is split over, unless told otherwise

# Keyword arguments split along the batch like y (one entry per row); the others are
# hyperparameters, replicated.
_PER_ROW = ("valid", "ids")


def sharded(
    loss: Callable[..., jax.Array],
    mesh: Mesh,
    axis_name: str | tuple[str, ...] = BATCH_AXIS,
    *,
    check_vma: bool = True,
) -> Callable[..., jax.Array]:
    """Wrap a loss so that it takes globally sharded embeddings, no shard_map needed.

    The wrapper runs ``loss(x_shard, y_shard, axis_name=axis_name, ...)`` under
    ``jax.shard_map`` over ``mesh``, with the batch split along ``axis_name`` into ``n``
    equal shards and the result replicated. Hyperparameters given as arrays (a learned
    temperature or bias) are passed in replicated and stay differentiable; Python values
    are static; ``valid`` and ``ids`` are split like ``y``.

    Global layout. Each device pairs its shard of ``x`` with the first ``B / n`` rows of
    its shard of ``y``: the global ``y`` ``(M, D)`` is the concatenation over devices of
    ``[local positives (B / n rows); local extra negatives ((M - B) / n rows)]``, and
    ``valid``, ``ids`` ``(M,)`` follow the same order. With ``M = B`` that is simply
    ``y[i]`` pairs with ``x[i]``. From positives ``y_pos`` ``(B, D)`` and extra negatives
    ``y_neg`` ``(M - B, D)`` held apart, build it with :func:`losses.interleave`.

    Args:
      loss: ``losses.infonce``, ``losses.sigmoid`` or ``losses.decoupled`` (any function
        with their signature that takes ``axis_name``).
      mesh: the device mesh; the batch axes must be among its axes.
      axis_name: the mesh axis (or tuple of axes) the batch is split over.
      check_vma: passed to ``jax.shard_map`` (gradients are exact either way when taken
        outside the wrapper).

    Returns:
      ``call(x, y, **kwargs) -> loss``, with ``x`` ``(B, D)`` and ``y`` ``(M, D)`` global
      arrays whose leading sizes are multiples of ``n``.

    Example:
      >>> import jax, losses
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> clip = losses.sharded(losses.infonce, mesh, "data")
      >>> x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 16))
      >>> loss = jax.jit(clip)(x, x, temperature=0.1)
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    missing = [a for a in names if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"{getattr(loss, '__name__', 'loss')}: batch axis {axis_name!r} is not in the "
            f"mesh, whose axes are {mesh.axis_names}; pass one of those as axis_name."
        )
    n = 1
    for a in names:
        n *= mesh.shape[a]
    spec = P(axis_name)
    # On a mesh with Explicit axes, shard_map wants inputs already split as in_specs says;
    # on an Auto mesh it reshards by itself.
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    explicit = any(t == AxisType.Explicit for t in types.values())

    @functools.wraps(loss)
    def call(x: jax.Array, y: jax.Array, **kwargs) -> jax.Array:
        per_row = {k: kwargs.pop(k) for k in _PER_ROW if kwargs.get(k) is not None}
        for k in _PER_ROW:
            kwargs.pop(k, None)
        for name, a in (("x", x), ("y", y), *per_row.items()):
            if jax.numpy.ndim(a) >= 1 and a.shape[0] % n:
                raise ValueError(
                    f"{loss.__name__}: the global batch of {name} ({a.shape[0]} rows, shape "
                    f"{a.shape}) does not split into {n} equal shards along mesh axis "
                    f"{axis_name!r}; use a batch that is a multiple of {n}."
                )
        if explicit:
            x, y = (jax.reshard(a, NamedSharding(mesh, spec)) for a in (x, y))
            per_row = {k: jax.reshard(v, NamedSharding(mesh, spec)) for k, v in per_row.items()}
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in kwargs.items() if k not in arrays}

        def local(x, y, arrays, per_row):
            return loss(x, y, axis_name=axis_name, **static, **arrays, **per_row)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec, P(), spec),
            out_specs=P(),
            check_vma=check_vma,
        )(x, y, arrays, per_row)

    return call


def interleave(positives: jax.Array, negatives: jax.Array, shards: int) -> jax.Array:
    """The global layout of ``y`` (or ``valid``, ``ids``) for a batch split in ``shards``.

    Shard ``k`` of the result is ``[positives shard k; negatives shard k]``, so that inside
    ``shard_map`` (or :func:`losses.sharded`) the first ``B / shards`` local rows of ``y``
    are the positives of the local ``x``.

    Args:
      positives: ``(B, ...)``, row ``i`` pairs with ``x[i]``.
      negatives: ``(M - B, ...)``, extra negatives (any order).
      shards: the number of devices the batch is split over; it must divide ``B`` and
        ``M - B``.

    Returns:
      ``(M, ...)``, rows reordered, nothing copied twice.

    Example:
      >>> import jax.numpy as jnp, losses
      >>> losses.interleave(jnp.arange(4), jnp.arange(10, 16), 2).tolist()
      [0, 1, 10, 11, 12, 2, 3, 13, 14, 15]
    """
    pos, neg = jax.numpy.asarray(positives), jax.numpy.asarray(negatives)
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(
            f"interleave: positives {pos.shape} and negatives {neg.shape} must agree past "
            "the first axis."
        )
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"interleave: shards must be a positive int, got {shards!r}.")
    for name, a in (("positives", pos), ("negatives", neg)):
        if a.shape[0] % shards:
            raise ValueError(
                f"interleave: {name} has {a.shape[0]} rows, not a multiple of shards={shards}."
            )
    rest = pos.shape[1:]
    both = jax.numpy.concatenate(
        [pos.reshape(shards, -1, *rest), neg.reshape(shards, -1, *rest)], axis=1
    )
    return both.reshape(-1, *rest)


def gathered(loss: Callable[..., jax.Array], axis_name: str | tuple[str, ...]):
    """The all-gather baseline, for benchmarks only: gather the batch, then the tiled loss.

    Inside ``shard_map``: every device gathers all ``B`` rows of ``x`` and all ``M`` rows of
    ``y`` (``O(M · D)`` memory per device, what the ring avoids) and computes the whole loss
    with the single-device tiled loss; ``1/n`` of it is summed over devices so that the
    all-gather's transpose (a reduce-scatter) hands each device its rows' exact gradient.
    The local layout is the ring's (``[positives; extra negatives]`` per device, see
    :func:`sharded`); ``valid`` and ``ids`` are gathered like ``y``.
    """

    @functools.wraps(loss)
    def call(x: jax.Array, y: jax.Array, **kwargs) -> jax.Array:
        n = jax.lax.psum(1, axis_name)
        b = x.shape[0]
        gather = lambda a: jax.lax.all_gather(a, axis_name, tiled=True)

        def single_device_layout(a):
            # All positives, then all extra negatives: what the single-device loss expects.
            if a.shape[0] == b:
                return gather(a)
            return jax.numpy.concatenate([gather(a[:b]), gather(a[b:])])

        per_row = {k: kwargs.pop(k, None) for k in _PER_ROW}
        per_row = {k: single_device_layout(v) for k, v in per_row.items() if v is not None}
        return jax.lax.psum(
            loss(gather(x), single_device_layout(y), **kwargs, **per_row) / n, axis_name
        )

    return call
