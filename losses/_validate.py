"""Trace-time checks of loss inputs: a clear ``ValueError`` that names the shapes."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def _static_value(v):
    """The Python number behind ``v`` if it is known at trace time, else None."""
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, jax.core.Tracer):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def check_scalar(name: str, value, *, positive: bool) -> None:
    shape = jnp.shape(value)
    if shape not in ((), (1,)):
        raise ValueError(f"{name} must be a scalar, got an array of shape {shape}.")
    v = _static_value(value)
    if positive and v is not None and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}.")


def check_pair(
    x: jax.Array,
    y: jax.Array,
    loss: str,
    *,
    min_batch: int,
    temperature=None,
    sigma=None,
) -> None:
    """Validate a pair of embedding matrices ``x``, ``y`` of shape ``(B, D)``."""
    for name, a in (("x", x), ("y", y)):
        if jnp.ndim(a) != 2:
            raise ValueError(
                f"{loss}: {name} must have shape (batch, dim), got shape {jnp.shape(a)}; "
                "flatten or reshape the embeddings to rank 2."
            )
        dtype = jnp.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{loss}: {name} must be a floating-point array (float32 or bfloat16), "
                f"got dtype {dtype}; cast the embeddings with .astype(jnp.float32)."
            )
    if jnp.shape(x) != jnp.shape(y):
        raise ValueError(
            f"{loss}: x and y must have the same shape (row i of x pairs with row i of y), "
            f"got x {jnp.shape(x)} and y {jnp.shape(y)}."
        )
    if jnp.result_type(x) != jnp.result_type(y):
        raise ValueError(
            f"{loss}: x and y must have the same dtype, got {jnp.result_type(x)} and "
            f"{jnp.result_type(y)}."
        )
    if x.shape[0] < min_batch:
        raise ValueError(
            f"{loss}: needs a batch of at least {min_batch} pairs, got x of shape {jnp.shape(x)}."
        )
    if temperature is not None:
        check_scalar("temperature", temperature, positive=True)
    if sigma is not None:
        check_scalar("sigma", sigma, positive=True)
