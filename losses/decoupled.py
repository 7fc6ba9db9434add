"""Decoupled contrastive loss (DCL) and its weighted form (DCLW)."""

from __future__ import annotations

import jax

from losses._softmax import softmax_contrastive


def decoupled(
    x: jax.Array,
    y: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    sigma: float | jax.Array | None = None,
    symmetric: bool = True,
    intra_view: bool = False,
    valid: jax.Array | None = None,
    ids: jax.Array | None = None,
    block_size: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Decoupled contrastive loss (Yeh et al. 2022, arXiv 2110.06848), tiled.

    As :func:`losses.infonce`, but the positive pair is removed from every denominator:
    ``ℓ_i = logsumexp_{j≠i} s_ij − w_i s_ii`` (and the same-view terms with
    ``intra_view=True``), which removes the negative-positive coupling that makes InfoNCE
    sensitive to the batch size. ``sigma=None`` gives DCL (``w_i = 1``); a float gives
    DCLW, ``w_i = 2 − B · softmax_i(x_i · y_i / σ)`` over the global batch, computed
    without gradient. Needs a global batch of at least 2 rows of ``y``.

    With ``valid``, the DCLW softmax runs over the valid pairs only and ``B`` in ``w_i``
    becomes their number ``V``. An anchor without any negative (masked out, or every
    candidate sharing its id) has loss 0.

    Args:
      x, y: ``(B, D)`` and ``(M, D)`` embeddings, as in :func:`losses.infonce`.
      temperature: ``τ``, float or scalar array (differentiable); a traced value must be
        finite and > 0 (checked under ``checkify``).
      sigma: DCLW's ``σ`` (finite, > 0; a traced value is checked under ``checkify``),
        or None for DCL.
      symmetric, intra_view, valid, ids, block_size, axis_name: as in
        :func:`losses.infonce`.

    Returns:
      The scalar float32 loss over the global batch.

    Example:
      >>> import jax, losses
      >>> x = jax.random.normal(jax.random.key(0), (256, 32))
      >>> y = x + 0.1 * jax.random.normal(jax.random.key(1), (256, 32))
      >>> # Without the positive in the denominator, DCL <= InfoNCE at the same temperature.
      >>> bool(losses.decoupled(x, y) <= losses.infonce(x, y, temperature=0.1))
      True
    """
    return softmax_contrastive(
        x,
        y,
        loss="decoupled",
        temperature=temperature,
        symmetric=symmetric,
        intra_view=intra_view,
        drop_positive=True,
        sigma=sigma,
        valid=valid,
        ids=ids,
        block_size=block_size,
        axis_name=axis_name,
    )
