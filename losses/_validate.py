"""Checks of loss inputs: a one-line ``ValueError``/``TypeError`` that names the argument.

Shapes, dtypes and Python values are checked at trace time, before any work. Traced
hyperparameters cannot be: ``checked_scalar`` adds ``checkify.debug_check`` calls for
them, which cost nothing unless the caller wraps the computation with
``jax.experimental.checkify.checkify`` (then a bad value is reported, not a NaN).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# The tiled losses multiply in these dtypes and accumulate in float32.
EMBEDDING_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


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


def check_block_size(loss: str, block_size) -> int | None:
    """``block_size`` as a Python int (NumPy integers accepted), or None."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(
            f"{loss}: block_size must be a positive int or None, got {block_size!r} "
            f"({type(block_size).__name__})."
        )
    if block_size < 1:
        raise ValueError(f"{loss}: block_size must be a positive int or None, got {block_size}.")
    return int(block_size)


def check_scalar(loss: str, name: str, value, *, positive: bool) -> None:
    """A real scalar (float, int or a shape () / (1,) float array), finite, and > 0 if
    ``positive``, as far as it is known at trace time."""
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(
            f"{loss}: {name} must be a float or a scalar float array, got {value!r} "
            f"({type(value).__name__})."
        )
    try:
        dtype = jnp.result_type(value)
    except TypeError as e:
        raise TypeError(
            f"{loss}: {name} must be a float or a scalar float array, got {type(value).__name__}."
        ) from e
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{loss}: {name} must be a real number, got dtype {dtype}.")
    shape = jnp.shape(value)
    if shape not in ((), (1,)):
        raise ValueError(f"{loss}: {name} must be a scalar, got an array of shape {shape}.")
    v = _static_value(value)
    if v is None:
        return
    if not math.isfinite(v):
        raise ValueError(f"{loss}: {name} must be finite, got {v}.")
    if positive and not v > 0:
        raise ValueError(f"{loss}: {name} must be > 0, got {v}.")


def checked_scalar(loss: str, name: str, value, *, positive: bool) -> jax.Array:
    """``value`` as a float32 scalar, with checkify debug checks of what tracing can't see.

    The checks are no-ops unless the caller runs under ``checkify.checkify``.
    """
    v = jnp.asarray(value, jnp.float32).reshape(())
    if _static_value(value) is None:
        ok = jnp.isfinite(v) & (v > 0) if positive else jnp.isfinite(v)
        want = "finite and > 0" if positive else "finite"
        checkify.debug_check(ok, f"{loss}: {name} must be {want}, got {{v}}.", v=v)
    return v


def as_array(loss: str, name: str, a):
    """``a`` as an array: arrays (JAX, NumPy, tracers) as they are, array-likes such as
    nested lists through ``jnp.asarray`` (Python floats become float32, as in any JAX
    function); TypeError naming the loss if ``a`` is no array at all.

    >>> as_array("infonce", "x", [[1.0, 0.0]]).dtype
    dtype('float32')
    """
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return a
    try:
        return jnp.asarray(a)
    except (TypeError, ValueError):
        raise TypeError(
            f"{loss}: {name} must be an array of shape (batch, dim) (a JAX or NumPy array, or "
            f"nested lists of numbers), got {type(a).__name__}."
        ) from None


def check_pair(
    x,
    y,
    loss: str,
    *,
    min_batch: int,
    dtypes: tuple | None = EMBEDDING_DTYPES,
    intra_view: bool = False,
) -> None:
    """Validate ``x`` ``(B, D)`` and ``y`` ``(M, D)``, ``M ≥ B`` (``M = B`` for intra_view).

    ``dtypes``: the embedding dtypes allowed (None: any floating dtype, for the oracle).
    Array-likes (nested lists) are checked as :func:`as_array` converts them.
    """
    x, y = as_array(loss, "x", x), as_array(loss, "y", y)
    for name, a in (("x", x), ("y", y)):
        if jnp.ndim(a) != 2:
            raise ValueError(
                f"{loss}: {name} must have shape (batch, dim), got shape {jnp.shape(a)}; "
                "flatten or reshape the embeddings to rank 2."
            )
        dtype = jnp.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{loss}: {name} must be a floating-point array (float32 or bfloat16), "
                f"got dtype {dtype}; cast the embeddings with .astype(jnp.float32)."
            )
        if dtypes is not None and dtype not in dtypes:
            raise TypeError(
                f"{loss}: {name} has dtype {dtype}; the tiled losses take float32 or "
                "bfloat16 (accumulating in float32): cast with .astype(jnp.float32)."
            )
    (b, d), (m, dy) = jnp.shape(x), jnp.shape(y)
    if d != dy:
        raise ValueError(
            f"{loss}: x and y must have the same shape (B, D) and (M, D) (same feature "
            f"size), got x {jnp.shape(x)} and y {jnp.shape(y)}."
        )
    if d == 0:
        raise ValueError(f"{loss}: x and y have no features (D = 0): shape {jnp.shape(x)}.")
    if m < b:
        raise ValueError(
            f"{loss}: y must have at least as many rows as x (y[i] is the positive of x[i]; "
            f"rows past B are extra negatives), got x {jnp.shape(x)} and y {jnp.shape(y)}."
        )
    if intra_view and m != b:
        raise ValueError(
            f"{loss}: intra_view=True needs x and y of the same shape (no extra negatives), "
            f"got x {jnp.shape(x)} and y {jnp.shape(y)}."
        )
    if jnp.result_type(x) != jnp.result_type(y):
        raise TypeError(
            f"{loss}: x and y must have the same dtype, got {jnp.result_type(x)} and "
            f"{jnp.result_type(y)}."
        )
    if b < min_batch:
        raise ValueError(
            f"{loss}: needs a batch of at least {min_batch} pairs, got x of shape {jnp.shape(x)}."
        )


def check_masks(loss: str, valid, ids, rows: int) -> None:
    """``valid``: None or bool ``(rows,)``; ``ids``: None or integer ``(rows,)``; ``rows``
    is the number of rows of ``y`` (local rows inside shard_map)."""
    for name, a, kind in (("valid", valid, "a bool"), ("ids", ids, "an integer")):
        if a is None:
            continue
        try:
            dtype = jnp.result_type(a)
        except TypeError as e:
            raise TypeError(f"{loss}: {name} must be {kind} array, got {type(a)}.") from e
        ok = dtype == jnp.bool_ if name == "valid" else jnp.issubdtype(dtype, jnp.integer)
        if not ok:
            raise TypeError(f"{loss}: {name} must be {kind} array, got dtype {dtype}.")
        if jnp.shape(a) != (rows,):
            raise ValueError(
                f"{loss}: {name} must have shape ({rows},), one entry per row of y, got "
                f"shape {jnp.shape(a)}."
            )
