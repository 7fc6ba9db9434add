"""Mesh-axis helpers shared by the loss front ends and the ring: sizes and varying axes."""

from __future__ import annotations

import jax
from jax import lax

AxisName = str | tuple[str, ...] | None


def axis_size(axis_name: AxisName) -> int:
    """Number of devices along ``axis_name`` (1 for None); NameError outside its shard_map."""
    if axis_name is None:
        return 1
    return int(lax.psum(1, axis_name))


def _varying_axes(a) -> frozenset:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def match_varying(a: jax.Array, like: jax.Array) -> jax.Array:
    """Mark ``a`` as varying over the mesh axes ``like`` varies over (under check_vma).

    Loop carries and the scalar hyperparameters must have the same varying-axes type as
    the sharded embeddings; without check_vma every set is empty and this is a no-op.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(a)))
    return lax.pcast(a, missing, to="varying") if missing else a
