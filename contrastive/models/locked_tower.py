"""Locked image towers (LiT / SigLiT): pre-train an image tower once, freeze it, cache its features.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", arXiv
2111.07991) and SigLiT (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
arXiv 2303.15343, Section 4) keep a pre-trained image tower *locked*: its weights never
change, so the embedding of every image is computed once and a contrastive step only runs
the text tower, the heads, the temperature, the bias and the loss. A step at B = 16,384
pairs then costs little more than the loss itself, which is what lets the batch-size study
reach large batches on a CPU.

The pieces, in the order a study uses them:

1. :func:`pretrain_image_tower`: supervised pre-training of a small image tower on the
   generated ``shapes`` data (:mod:`contrastive.data.captioned_shapes`): one softmax head
   per attribute (shape, colour, size, position, texture), AdamW, a fixed number of steps,
   deterministic given the seed. The held-out (``test`` split) accuracy of every attribute
   is in the returned ``info``. :func:`pretrained_image_tower` caches the parameters, keyed
   by the pre-training config, so a study pre-trains once.
2. :func:`image_features`: the frozen tower's features of examples ``[0, N)`` of a split,
   float32 ``[N, F]``, computed in jitted batches; :func:`cached_features` stores them as
   ``.npy`` keyed by the tower's config, a sha256 of its parameter values, the split, the
   count and the data seed (:func:`tower_features` ties the two together).
   :func:`load_feature_file` reads a user's own features computed with any model.
3. :class:`LockedFeatures`: an "image tower" whose input *is* the feature row; with
   :class:`BagOfWordsText` as the text tower, a :class:`~contrastive.models.DualEncoder` of
   the two trains on top of the locked features (its image side: the head alone).

Example (the study's flow; a few seconds at this size)::

    cfg = PretrainConfig(train_examples=2048, steps=300)
    pre = pretrained_image_tower(cfg, cache_dir="/tmp/lit")       # pre-trains once
    feats = tower_features(pre, split="train", num_examples=4096, cache_dir="/tmp/lit")
    tokens, _ = shapes_captions("train", 4096)                   # int32 [4096, 16]
    model = DualEncoder(
        LockedFeatures(feats.shape[1]), BagOfWordsText(VOCAB_SIZE, TEXT_LEN, rngs=nnx.Rngs(0)),
        embed_dim=64, rngs=nnx.Rngs(0))
    # batches: (feats[idx], tokens[idx]) for the train step, as (inputs_x, inputs_y).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contrastive.data.captioned_shapes import (
    ATTRIBUTES,
    TEXT_LEN,
    CaptionedShapes,
    caption_id,
    encode,
)
from contrastive.data.feature_cache import (
    CACHE_VERSION,
    cached_features,
    json_digest,
    load_feature_file,
    params_digest,
    read_checked,
    read_entry_meta,
    warn_line,
    write_entry,
)
from contrastive.models import (
    dropout,
)
from contrastive.models.tower_pretraining import (
    PretrainConfig,
    PretrainedTower,
    batched_apply,
    build_image_tower,
    pretrain_image_tower,
    shapes_images,
    to_float_images,
)

__all__ = [
    "PretrainConfig",
    "PretrainedTower",
    "build_image_tower",
    "pretrain_image_tower",
    "pretrained_image_tower",
    "tower_cache_path",
    "image_features",
    "params_digest",
    "cached_features",
    "tower_features",
    "load_feature_file",
    "shapes_captions",
    "LockedFeatures",
    "BagOfWordsText",
]


def pretrained_image_tower(
    config: PretrainConfig | None = None, *, cache_dir: str | os.PathLike | None = None
) -> PretrainedTower:
    """:func:`pretrain_image_tower`, with the parameters cached in ``cache_dir``.

    Keyed by a sha256 of ``config`` (and the cache format): the first call pre-trains and
    writes ``tower-<key>.npz`` (the tower's state leaves) and ``tower-<key>.json`` (config,
    info, parameter digest, sha256 of the ``.npz``), atomically; later calls with the same
    config check the file's sha256, rebuild the tower and load the parameters, checking their
    digest: a truncated, corrupted or altered file (even one of the same shapes) is reported
    in one warning line naming it and pre-trained again.
    ``cache_dir=None`` always pre-trains.
    """
    config = PretrainConfig() if config is None else config
    if cache_dir is None:
        return pretrain_image_tower(config)
    key = _tower_key(config)
    path = tower_cache_path(config, cache_dir)
    meta = read_entry_meta(path, key)
    data = read_checked(path, meta, "pre-trained again") if meta is not None else None
    if data is not None:
        tower = build_image_tower(config)
        state = nnx.state(tower)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                loaded = [stored[f"leaf_{i:04d}"] for i in range(len(leaves))]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            loaded = None
        if loaded is not None and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(loaded, leaves, strict=True)
        ):
            new_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in loaded])
            if params_digest(new_state) == meta["info"]["params_sha256"]:
                nnx.update(tower, new_state)
                return PretrainedTower(tower, config, {**meta["info"], "from_cache": True})
        warn_line(
            f"cache entry {path} does not hold the tower it describes; it is pre-trained again"
        )
    pre = pretrain_image_tower(config)
    leaves = jax.tree_util.tree_leaves(nnx.state(pre.tower))
    buffer = io.BytesIO()
    np.savez(buffer, **{f"leaf_{i:04d}": np.asarray(a) for i, a in enumerate(leaves)})
    meta = {"key": key, "config": config.to_dict(), "info": pre.info}
    write_entry(path, buffer.getvalue(), meta)
    return pre


def _tower_key(config: PretrainConfig) -> str:
    return json_digest({"version": CACHE_VERSION, "pretrain": config.to_dict()}, "config")


def tower_cache_path(config: PretrainConfig | None, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`pretrained_image_tower` caches the tower of ``config`` (None: default)."""
    config = PretrainConfig() if config is None else config
    return Path(cache_dir) / f"tower-{_tower_key(config)[:24]}.npz"


def image_features(
    tower: nnx.Module,
    *,
    split: str,
    num_examples: int,
    data_seed: int = 0,
    batch_size: int = 1024,
) -> np.ndarray:
    """The frozen ``tower``'s features of ``shapes`` examples ``[0, num_examples)`` of ``split``.

    Images are generated ``batch_size`` at a time (uint8 -> [0, 1] floats, as in
    pre-training) and encoded by one jitted function (the last batch padded, so it compiles
    once); no dropout. Returns float32 ``[num_examples, F]`` in example order.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    graphdef, state = nnx.split(tower)

    @jax.jit
    def encode_batch(state, images):
        return [nnx.merge(graphdef, state)(to_float_images(images)).astype(jnp.float32)]

    out = np.empty((num_examples, tower.features), np.float32)
    for start in range(0, num_examples, batch_size):
        stop = min(start + batch_size, num_examples)
        images, _ = shapes_images(split, start, stop, data_seed)
        (out[start:stop],) = batched_apply(encode_batch, state, images, batch_size)
    return out


def tower_features(
    pretrained: PretrainedTower,
    *,
    split: str,
    num_examples: int,
    data_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """:func:`image_features` of a pre-trained tower, through :func:`cached_features` when
    ``cache_dir`` is set. float32 ``[num_examples, F]``."""

    def compute():
        return image_features(
            pretrained.tower,
            split=split,
            num_examples=num_examples,
            data_seed=data_seed,
            batch_size=batch_size,
        )

    if cache_dir is None:
        return compute()
    return cached_features(
        cache_dir,
        pretrained.tower_config(),
        nnx.state(pretrained.tower),
        split,
        num_examples,
        compute,
        data_seed=data_seed,
    )


@functools.lru_cache(maxsize=4)  # a study's runs share the same captions: build them once
def shapes_captions(
    split: str, num_examples: int, *, data_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Caption tokens int32 ``[N, TEXT_LEN]`` and caption ids int32 ``[N]`` of ``shapes``
    examples ``[0, N)``, exactly ``src[i]["text"]`` and ``src[i]["caption_id"]``, without
    rendering the images (about 10x faster): the text side of a locked-tower data set."""
    src = CaptionedShapes(split, num_examples=num_examples, seed=data_seed)
    tokens = np.empty((num_examples, TEXT_LEN), np.int32)
    ids = np.empty((num_examples,), np.int32)
    for i in range(num_examples):
        attrs, _ = src.attributes(i)
        tokens[i] = encode(attrs, attrs["template"])
        ids[i] = caption_id(*(attrs[k] for k in ATTRIBUTES))
    tokens.flags.writeable = ids.flags.writeable = False  # cached: shared by every caller
    return tokens, ids


# ------------------------------------------------------------------ the locked model


class LockedFeatures(nnx.Module):
    """The locked "image tower": its input is the precomputed feature row, [B, F] -> [B, F].

    No parameters: the pre-trained tower already ran, once, when the features were cached
    (LiT, Zhai et al. 2022). ``normalize=True`` divides each row by its L2 norm, a fixed
    map that makes features of any model (whose scale is arbitrary) the same size for the
    trainable head on top, so its learning rate carries over; ``False`` passes the rows
    through unchanged (cast to float32). The input is under ``stop_gradient``: nothing
    upstream of the features can be trained through this tower.

    Example::

        tower = LockedFeatures(128)
        tower(jnp.ones((4, 128))).shape  # (4, 128)
    """

    def __init__(self, features: int, *, normalize: bool = True):
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive integer, got {features!r}")
        self.features = features
        self.normalize = normalize

    def __call__(self, inputs: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if inputs.ndim != 2 or inputs.shape[-1] != self.features:
            raise ValueError(
                f"LockedFeatures({self.features}) takes feature rows [B, {self.features}], "
                f"got shape {inputs.shape}: pass the cached features, not images"
            )
        x = jax.lax.stop_gradient(inputs.astype(jnp.float32))
        if self.normalize:
            x = _unit_rows(x)
        return x


def _unit_rows(x: jax.Array) -> jax.Array:
    """``x_i / |x_i|`` per row of ``x`` [B, F], safe for any finite values.

    ``sum x^2`` overflows float32 for entries beyond ~1.8e19 (a row of 1e30s would become 0
    through ``rsqrt(inf)``) and underflows below ~1e-19. Such rows are divided by their
    largest ``|x_j|`` first (entries in [-1, 1], squared norm in [1, F]; the direction is
    unchanged); every other row takes the plain formula, so ordinary features give the same
    bits as before. An all-zero row stays 0.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    plain = x * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))
    peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scaled = x / jnp.where(peak > 0, peak, 1.0)
    scaled = scaled * jax.lax.rsqrt(jnp.maximum(jnp.sum(scaled * scaled, -1, keepdims=True), 1e-12))
    return jnp.where(jnp.isfinite(sq) & (sq >= 1e-12), plain, scaled)


class BagOfWordsText(nnx.Module):
    """A cheap text tower: mean of learned token embeddings, then a 2-layer MLP.

    ``e = (1/n) sum_{t: tok_t != pad} E[tok_t]`` [width] over the ``n`` real tokens (a
    caption of only padding gives 0), then ``h = W2 gelu(W1 LN(e) + b1) + b2`` [width]
    with dropout after the GELU. Forward cost per caption: ``L`` gathers and two
    ``width x hidden`` matmuls, about ``4 width hidden`` = 33 kFLOP at the defaults, against
    ``2 B D`` per caption for the similarities of the loss (2.1 MFLOP at B = 16,384,
    D = 64): at large batches the step's cost is the loss's.
    Word order is ignored, which is enough for ``shapes`` captions (every attribute is a
    distinct word; position is "top left", "left", ...). The call signature is that of
    :class:`contrastive.models.TextTransformer`: ``tower(tokens [B, L], key=None)``, and
    ``features`` is the output width.

    Example::

        text = BagOfWordsText(36, 16, rngs=nnx.Rngs(0))
        text(jnp.ones((4, 16), jnp.int32)).shape  # (4, 64)
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int = 64,
        hidden: int | None = None,
        *,
        pad_id: int = 0,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = hidden or 2 * width
        self.embed = nnx.Embed(vocab_size, width, **kw)
        self.ln = nnx.LayerNorm(width, **kw)
        self.fc1 = nnx.Linear(width, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, width, **kw)
        self.pad_id = pad_id
        self.max_len = max_len
        self.dropout_rate = dropout_rate
        self.features = width

    def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(
                f"BagOfWordsText takes tokens [B, L] with L <= max_len={self.max_len}, "
                f"got shape {tokens.shape}"
            )
        mask = (tokens != self.pad_id)[..., None].astype(jnp.float32)  # (B, L, 1)
        e = self.embed(tokens).astype(jnp.float32)  # (B, L) -> (B, L, width)
        e = jnp.sum(e * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        h = jax.nn.gelu(self.fc1(self.ln(e)))  # (B, width) · (width, hidden) -> (B, hidden)
        h = dropout(h, self.dropout_rate, key)
        return self.fc2(h)  # (B, hidden) · (hidden, width) -> (B, width)
