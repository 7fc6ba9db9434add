"""InfoNCE (CLIP) and NT-Xent (SimCLR): the softmax contrastive losses."""

from __future__ import annotations

import jax

from losses._axes import AxisName
from losses._softmax import softmax_contrastive


def infonce(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
    block_size: int | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""InfoNCE / CLIP contrastive loss, tiled; NT-Xent with ``intra_view=True``.

    With logits ``s_ij = x_i · y_j / τ``, ``B`` pairs ``(x_i, y_i)`` and ``M − B`` extra
    negatives ``y_B … y_{M−1}``, the x→y loss of anchor ``i`` is
    ``ℓ_i = logsumexp_{j<M} s_ij − s_ii`` and the y→x loss of anchor ``j < B`` is
    ``ℓ'_j = logsumexp_{i<B} s_ij − s_jj`` (only the positives are y anchors, with the rows
    of ``x`` as candidates, as sentence-transformers' symmetric ranking loss does).
    ``symmetric=True`` returns ``½ (mean ℓ + mean ℓ')`` (CLIP, Radford et al. 2021);
    ``False`` returns ``mean ℓ`` (van den Oord et al. 2018). ``intra_view=True`` adds
    same-view negatives to every denominator, ``x_i · x_k / τ`` and ``y_j · y_k / τ`` for
    ``k ≠`` the anchor: SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709), averaged over
    all ``2B`` anchors when symmetric.

    Masks. ``valid[i] = False`` (``i < B``) removes the pair ``(x_i, y_i)``: it is neither
    an anchor nor a negative anywhere (a padded last batch); for ``i ≥ B`` it removes that
    extra negative. Means run over the ``V`` valid pairs; with none, the loss is 0 with
    zero gradients. ``ids``: a candidate ``j ≠ i`` with ``ids[j] == ids[i]`` is no negative
    of anchor ``i`` (duplicate captions, several images of one product), in both directions
    and in the same-view terms; the positive is unaffected. An anchor left with no negative
    has loss 0. Invalid rows may hold anything (NaN included): they get zero gradients.

    The ``B × M`` matrix never exists: tiles of ``block_size`` rows are folded into running
    log-sum-exps and recomputed in the backward pass (Inf-CL, Cheng et al. 2024, arXiv
    2410.17243); masks enter the tiles as per-row vectors. Memory beyond inputs and outputs
    is ``O(M)`` plus a few tiles.

    Args:
      x: ``(B, D)`` anchors, float32 or bfloat16 (used as given: normalise them in the
        model). Inside ``jax.shard_map`` with ``axis_name``, the local ``(B / n, D)`` shard.
      y: ``(M, D)``, ``M ≥ B``, same dtype: ``y[i]`` is the positive of ``x[i]`` for
        ``i < B``, the rest extra negatives for every anchor. Inside ``shard_map``, the
        local ``(M / n, D)`` shard, whose first ``B / n`` rows pair with the local ``x``
        (see :func:`losses.sharded` and :func:`losses.interleave` for the global layout).
      temperature: ``τ``, a float or a scalar array (differentiable). A traced value must
        be finite and > 0; it is checked when the caller wraps with
        ``jax.experimental.checkify.checkify`` (Python values are checked always).
      symmetric: average both directions (CLIP) or use x→y only.
      intra_view: add same-view negatives (NT-Xent); needs ``M = B``.
      valid: None or bool ``(M,)`` (local ``(M / n,)`` inside ``shard_map``).
      ids: None or integer ``(M,)`` (local shard inside ``shard_map``).
      block_size: tile edge (a positive int); ``None`` picks one. Any value gives the same
        result.
      axis_name: mesh axis (or tuple of axes) the batch is sharded over, inside
        ``shard_map``; ``None`` when ``x``, ``y`` are the whole batch.

    Returns:
      The scalar float32 loss over the global batch (the same on every device).

    Example:
      >>> import jax, losses
      >>> x = jax.random.normal(jax.random.key(0), (512, 64))
      >>> y = x + 0.1 * jax.random.normal(jax.random.key(1), (512, 64))
      >>> loss, (dx, dy) = jax.value_and_grad(losses.infonce, argnums=(0, 1))(x, y)
      >>> bool(jax.numpy.isfinite(loss))
      True
      >>> # 256 hard negatives for every anchor, and the last 12 pairs padding:
      >>> negatives = jax.random.normal(jax.random.key(2), (256, 64))
      >>> valid = jax.numpy.arange(512 + 256) < 500
      >>> valid = valid.at[512:].set(True)
      >>> hard = losses.infonce(x, jax.numpy.concatenate([y, negatives]), valid=valid)
      >>> bool(hard >= losses.infonce(x[:500], y[:500]))
      True
    """
    return softmax_contrastive(
        x,
        y,
        loss="infonce",
        temperature=temperature,
        symmetric=symmetric,
        intra_view=intra_view,
        drop_positive=False,
        sigma=None,
        valid=valid,
        ids=ids,
        block_size=block_size,
        axis_name=axis_name,
    )
