"""Calling the ring losses on globally sharded arrays from ordinary ``jax.jit`` code."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def sharded(
    loss: Callable[..., jax.Array],
    mesh: Mesh,
    axis_name: str | tuple[str, ...] = "data",
    *,
    check_vma: bool = True,
) -> Callable[..., jax.Array]:
    """Wrap a loss so that it takes globally sharded ``(B, D)`` embeddings, no shard_map needed.

    The wrapper runs ``loss(x_shard, y_shard, axis_name=axis_name, ...)`` under
    ``jax.shard_map`` over ``mesh``, with the batch split along ``axis_name`` (one mesh axis
    or a tuple of them) and the result replicated. Hyperparameters given as arrays
    (a learned temperature or bias) are passed in replicated and stay differentiable;
    Python values are static.

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
    def call(x: jax.Array, y: jax.Array, **hyper) -> jax.Array:
        for name, a in (("x", x), ("y", y)):
            if jax.numpy.ndim(a) >= 1 and a.shape[0] % n:
                raise ValueError(
                    f"{loss.__name__}: the global batch of {name} ({a.shape[0]} rows, shape "
                    f"{a.shape}) does not split into {n} equal shards along mesh axis "
                    f"{axis_name!r}; use a batch that is a multiple of {n}."
                )
        if explicit:
            x, y = (jax.reshard(a, NamedSharding(mesh, spec)) for a in (x, y))
        arrays = {k: v for k, v in hyper.items() if isinstance(v, jax.Array)}
        static = {k: v for k, v in hyper.items() if k not in arrays}

        def local(x, y, arrays):
            return loss(x, y, axis_name=axis_name, **static, **arrays)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec, P()),
            out_specs=P(),
            check_vma=check_vma,
        )(x, y, arrays)

    return call


def gathered(loss: Callable[..., jax.Array], axis_name: str | tuple[str, ...]):
    """The all-gather baseline, for benchmarks only: gather the batch, then the tiled loss.

    Inside ``shard_map``: every device gathers all ``B`` rows of ``x`` and ``y``
    (``O(B · D)`` memory per device, what the ring avoids) and computes the whole loss with
    the single-device tiled engine; ``1/n`` of it is summed over devices so that the
    all-gather's transpose (a reduce-scatter) hands each device its rows' exact gradient.
    """

    @functools.wraps(loss)
    def call(x: jax.Array, y: jax.Array, **hyper) -> jax.Array:
        n = jax.lax.psum(1, axis_name)
        xa = jax.lax.all_gather(x, axis_name, tiled=True)
        ya = jax.lax.all_gather(y, axis_name, tiled=True)
        return jax.lax.psum(loss(xa, ya, **hyper) / n, axis_name)

    return call
