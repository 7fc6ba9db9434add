"""The loss of the train step: the configured loss of the model's embeddings, and its metrics.

:func:`make_loss_fn` gives ``loss_fn(params, (x, y)) -> (loss, aux)`` with the model's own
temperature and bias; dispatch goes through the loss registry
(:mod:`contrastive.loss_registry`), so a loss is named once. The metrics (mean positive and
negative logits) are global and never form the ``B x B`` matrix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from contrastive.step_configs import LossConfig
from losses._common import global_sum

__all__ = ["contrastive_loss", "make_loss_fn"]


def contrastive_loss(
    x: jax.Array,
    y: jax.Array,
    temperature: jax.Array,
    bias: jax.Array | None,
    cfg: LossConfig,
    *,
    axis_name: str | None = None,
    ids: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """The configured loss of embeddings x [B, D] and y [M, D], M >= B (local shards with
    ``axis_name``): ``y[:B]`` pair with ``x``, ``y[B:]`` are extra negatives.

    ``ids`` [M] (int): candidates with the anchor's id are not its negatives (duplicates);
    ``valid`` [M] (bool): False drops a pair or an extra negative (padding).
    """
    spec = cfg.spec
    kw: dict[str, Any] = {"temperature": temperature, "axis_name": axis_name}
    kw.update({name: getattr(cfg, name) for name in spec.options})
    if ids is not None:
        kw["ids"] = ids
    if valid is not None:
        kw["valid"] = valid
    if cfg.block_size is not None:
        kw["block_size"] = cfg.block_size
    if spec.has_bias:
        if bias is None:
            raise ValueError(
                f"the {cfg.name} loss needs a learnable bias: build the model with "
                f"DualEncoder(..., init_bias={spec.bias})."
            )
        kw["bias"] = bias
    return spec(x, y, **kw)


def logit_stats(x, y, temperature, bias, axis_name) -> dict[str, jax.Array]:
    """Mean positive and negative logits over the global batch, never forming B x B (O(B D))."""
    x = lax.stop_gradient(x).astype(jnp.float32)
    y = lax.stop_gradient(y).astype(jnp.float32)
    # A float: n (n - 1) overflows int32 from n = 46,341 pairs on.
    n = float(x.shape[0] * (1 if axis_name is None else lax.psum(1, axis_name)))
    pos = global_sum(jnp.sum(x * y), axis_name)  # sum_i x_i . y_i
    sx = global_sum(jnp.sum(x, axis=0), axis_name)
    sy = global_sum(jnp.sum(y, axis=0), axis_name)
    total = jnp.dot(sx, sy)  # (D,) . (D,) -> sum_ij x_i . y_j
    t = lax.stop_gradient(temperature)
    b = 0.0 if bias is None else lax.stop_gradient(bias)
    return {
        "pos_logit": pos / n / t + b,
        "neg_logit": (total - pos) / max(n * (n - 1), 1.0) / t + b,
    }


def make_loss_fn(
    graphdef: nnx.GraphDef,
    cfg: LossConfig,
    axis_name: str | None = None,
    ids: jax.Array | None = None,
    valid: jax.Array | None = None,
):
    """``loss_fn(params, (x, y)) -> (loss, aux)`` with the model's temperature and bias.

    With ``axis_name`` it runs inside ``shard_map`` on each device's rows (the ring loss);
    the loss and the metrics in ``aux`` are global either way. ``ids``, ``valid``: see
    :func:`contrastive_loss` (the local rows' inside ``shard_map``).
    """

    def loss_fn(params, embeddings):
        model = nnx.merge(graphdef, params)
        x, y = embeddings
        t = model.temperature()
        b = model.bias_value() if cfg.spec.has_bias else None
        loss = contrastive_loss(x, y, t, b, cfg, axis_name=axis_name, ids=ids, valid=valid)
        # The positives: the first rows of y (extra negatives follow them).
        aux = {"temperature": t, **logit_stats(x, y[: x.shape[0]], t, b, axis_name)}
        if b is not None:
            aux["bias"] = b
        return loss, aux

    return loss_fn
