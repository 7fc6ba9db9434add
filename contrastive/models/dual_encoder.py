"""The dual encoder (flax NNX): two towers, or one tower on two views, with projection heads.

A :class:`DualEncoder` maps a pair of inputs to a pair of L2-normalised embeddings
``(x, y)``, each [B, D], and carries the learnable temperature (log-parameterised, as in
CLIP and SigLIP) and, for the sigmoid loss, the learnable bias. Two configurations:

- one tower on two views (SimCLR): ``DualEncoder(tower)``; both views share the tower and
  the projection head;
- two towers (CLIP/SigLIP): ``DualEncoder(image_tower, text_tower)``.

The training code sees the model only through its functional core: ``graphdef, params =
nnx.split(model)``, then ``nnx.merge(graphdef, params).embed_x(inputs, key)`` (and
``embed_y``) per tower (:func:`contrastive.step.train_step.tower_fns`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contrastive.loss_registry import LOSSES
from contrastive.models.towers import fold_key

Dtype = Any

__all__ = [
    "DualEncoder",
    "encode_fn",
    "CLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_BIAS",
]

# The initial temperature and bias are the losses' own defaults (stated once, there).
CLIP_INIT_TEMPERATURE = LOSSES["infonce"].temperature  # 0.07, Radford et al.
SIGLIP_INIT_TEMPERATURE = LOSSES["sigmoid"].temperature  # 0.1, Zhai et al.
SIGLIP_INIT_BIAS = LOSSES["sigmoid"].bias  # -10


class _Head(nnx.Module):
    """Projection head: Linear, or Linear -> GELU -> Linear (SimCLR) when ``hidden`` is set."""

    def __init__(
        self, features: int, embed_dim: int, hidden: int | None, kw: dict, use_bias: bool = True
    ):
        self.fc1 = nnx.Linear(features, hidden or embed_dim, use_bias=use_bias, **kw)
        self.fc2 = nnx.Linear(hidden, embed_dim, use_bias=use_bias, **kw) if hidden else None

    def __call__(self, h: jax.Array) -> jax.Array:
        z = self.fc1(h)  # (B, F) · (F, H) -> (B, H)
        if self.fc2 is not None:
            z = self.fc2(jax.nn.gelu(z))  # (B, H) · (H, D) -> (B, D)
        return z


def _l2_normalize(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    z = z.astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))


class DualEncoder(nnx.Module):
    """Two towers (or one tower on two views) with projection heads and a learnable temperature.

    Args:
      tower_x: encoder of the first input; needs a ``features`` attribute and
        ``__call__(inputs, key=None) -> [B, features]``.
      tower_y: encoder of the second input; None shares ``tower_x`` and its head (SimCLR).
      embed_dim: D, the embedding width.
      head_hidden: hidden width of a two-layer projection head; None gives a linear head.
      init_temperature: tau at initialisation; stored as ``log_inv_temperature = log(1/tau)``
        (CLIP: 0.07, SigLIP: 0.1).
      init_bias: initial bias of the sigmoid loss (SigLIP: -10); None means no bias.
      learn_temperature: False keeps tau fixed (it is still a parameter, its gradient is 0).
      max_inverse_temperature: a ceiling on 1/tau (CLIP clamps it at 100: a learned
        temperature that runs towards 0 makes the logits, and the training, unstable); None:
        no ceiling.
      head_bias: False gives a linear head without bias (CLIP's projections).
      head_x: False gives no projection on the x side (LiT's locked tower, whose features
        are the embedding); needs ``embed_dim == tower_x.features``.
      dtype: compute dtype of the heads (e.g. ``jnp.bfloat16``); embeddings are float32.
      param_dtype: dtype of the parameters.
    """

    def __init__(
        self,
        tower_x: nnx.Module,
        tower_y: nnx.Module | None = None,
        *,
        embed_dim: int = 64,
        head_hidden: int | None = None,
        init_temperature: float = CLIP_INIT_TEMPERATURE,
        init_bias: float | None = None,
        learn_temperature: bool = True,
        max_inverse_temperature: float | None = None,
        head_bias: bool = True,
        head_x: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.tower_x = tower_x
        self.tower_y = tower_y
        if not head_x and tower_x.features != embed_dim:
            raise ValueError(
                f"head_x=False uses tower_x's features as the embedding: set "
                f"embed_dim={tower_x.features}."
            )
        self.head_x = (
            _Head(tower_x.features, embed_dim, head_hidden, kw, head_bias) if head_x else None
        )
        self.head_y = (
            None
            if tower_y is None
            else _Head(tower_y.features, embed_dim, head_hidden, kw, head_bias)
        )
        self.log_inv_temperature = nnx.Param(
            jnp.asarray(math.log(1.0 / init_temperature), jnp.float32)
        )
        self.bias = None if init_bias is None else nnx.Param(jnp.asarray(init_bias, jnp.float32))
        self.learn_temperature = learn_temperature
        if max_inverse_temperature is not None and not max_inverse_temperature > 0:
            raise ValueError(
                f"max_inverse_temperature must be > 0 or None, got {max_inverse_temperature}."
            )
        self.max_inverse_temperature = max_inverse_temperature

    @property
    def shared(self) -> bool:
        return self.tower_y is None

    def embed_x(self, inputs: Any, key: jax.Array | None = None) -> jax.Array:
        """[B, ...] inputs of the first kind -> [B, D] unit-norm float32 embeddings."""
        h = self.tower_x(inputs, key)
        return _l2_normalize(h if self.head_x is None else self.head_x(h))

    def embed_y(self, inputs: Any, key: jax.Array | None = None) -> jax.Array:
        """[B, ...] inputs of the second kind (or second view) -> [B, D] embeddings."""
        if self.tower_y is None:
            return self.embed_x(inputs, key)
        return _l2_normalize(self.head_y(self.tower_y(inputs, key)))

    def __call__(self, batch: tuple[Any, Any], key: jax.Array | None = None):
        """``(inputs_x, inputs_y)`` -> ``(x, y)``, both [B, D]; the views get distinct keys."""
        inputs_x, inputs_y = batch
        return self.embed_x(inputs_x, fold_key(key, 0)), self.embed_y(inputs_y, fold_key(key, 1))

    def temperature(self) -> jax.Array:
        """tau = exp(-log_inv_temperature), float32 scalar; with ``max_inverse_temperature``
        never below ``1 / max_inverse_temperature`` (no gradient past the ceiling)."""
        t = self.log_inv_temperature[...].astype(jnp.float32)
        if not self.learn_temperature:
            t = jax.lax.stop_gradient(t)
        if self.max_inverse_temperature is not None:
            t = jnp.minimum(t, math.log(self.max_inverse_temperature))
        return jnp.exp(-t)

    def bias_value(self) -> jax.Array | None:
        return None if self.bias is None else self.bias[...].astype(jnp.float32)


def encode_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any, jax.Array | None], Any]:
    """``f(params, (inputs_x, inputs_y), key) -> (x, y)``: both towers of the model at once.

    A convenience for evaluation and tests; the train step calls each tower on its own
    (:func:`contrastive.step.train_step.tower_fns`), chunk by chunk.
    """

    def f(params: Any, batch: Any, key: jax.Array | None = None):
        return nnx.merge(graphdef, params)(batch, key)

    return f
