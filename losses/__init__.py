"""Contrastive losses for huge batches: InfoNCE, sigmoid and decoupled, tiled and ring-sharded.

Pure JAX; depends on ``jax`` alone. Each loss takes ``(B, D)`` embeddings ``x`` and
``(M, D)`` embeddings ``y``, ``M ≥ B`` (row ``i`` of ``x`` pairs with row ``i`` of ``y``;
rows past ``B`` are extra negatives), optional ``valid`` and ``ids`` vectors, and returns a
scalar. The similarity matrix is never built: it is computed tile by tile (``block_size``)
and, inside ``jax.shard_map`` with ``axis_name``, around a ring of devices.

>>> import jax, losses
>>> x = jax.random.normal(jax.random.key(0), (1024, 128))
>>> loss = losses.infonce(x, x, temperature=0.1)

``losses.sharded(loss, mesh, axis)`` calls a loss on globally sharded arrays from plain
``jax.jit`` code; ``losses.interleave`` lays out extra negatives for it.
``losses.reference`` holds dense versions of the same losses: the oracle of the tests.
"""

from losses import _reference as reference
from losses._sharded import gathered, interleave, sharded
from losses.decoupled import decoupled
from losses.global_contrastive import global_infonce
from losses.infonce import infonce
from losses.sigmoid import sigmoid

__all__ = [
    "infonce",
    "sigmoid",
    "decoupled",
    "global_infonce",
    "sharded",
    "interleave",
    "gathered",
    "reference",
]
