"""CLIP-sized two-tower models (ViT image tower, causal text transformer), for planning at scale.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Tables 19-20. :data:`CLIP_CONFIGS` names the sizes; :func:`clip_model` builds
one as a :class:`~contrastive.models.dual_encoder.DualEncoder`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contrastive.models.dual_encoder import CLIP_INIT_TEMPERATURE, DualEncoder
from contrastive.models.towers import Block, conv_kernel_init

Dtype = Any

__all__ = [
    "ClipConfig",
    "CLIP_CONFIGS",
    "StackedBlocks",
    "ClipImageTower",
    "ClipTextTower",
    "clip_config",
    "clip_model",
    "clip_input_spec",
]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Sizes of a CLIP two-tower model: a ViT image tower and a causal text transformer.

    ``embed_dim`` is the shared embedding width D; ``context_length`` the text length L.
    """

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408


CLIP_CONFIGS: dict[str, ClipConfig] = {
    "vit-b-32": ClipConfig(224, 32, 768, 12, 12, 512, 512, 12, 8),
    "vit-b-16": ClipConfig(224, 16, 768, 12, 12, 512, 512, 12, 8),
    "vit-l-14": ClipConfig(224, 14, 1024, 24, 16, 768, 768, 12, 12),
    # A toy of the same structure for tests (seconds to build and compile on a CPU).
    "vit-tiny": ClipConfig(32, 8, 32, 2, 2, 16, 32, 2, 2, context_length=8, vocab_size=64),
}

# CLIP's input normalisation (per RGB channel, on [0, 1] pixels).
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class StackedBlocks(nnx.Module):
    """``depth`` identical pre-LN transformer blocks, parameters stacked on a leading axis.

    The blocks run under ``jax.lax.scan``: the compiled program holds one block whatever
    the depth, so compile time stays flat from 2 to 24 layers. ``remat=True`` wraps the
    block in ``jax.checkpoint``: the backward pass recomputes a block from its input, and
    only the ``(B, n, width)`` input of each layer is kept for it, not the attention
    matrix and MLP activations (about 10x less activation memory for one more forward).

    Every stacked parameter has shape ``(depth, *shape of one block's parameter)``.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        heads: int,
        *,
        causal: bool = False,
        remat: bool = False,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r: nnx.Rngs) -> Block:
            return Block(width, heads, 0.0, dict(dtype=dtype, param_dtype=param_dtype, rngs=r))

        self.layers = make(rngs)
        self.depth = depth
        self.causal = causal
        self.remat = remat

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x`` (B, n, width) -> (B, n, width); ``mask`` (B, n) True for real tokens."""
        graphdef, stacked = nnx.split(self.layers)
        causal = self.causal

        def layer(h, params):
            return nnx.merge(graphdef, params)(h, mask, None, causal=causal), None

        if self.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)  # scan keeps the CSE barrier
        x, _ = jax.lax.scan(layer, x, stacked)
        return x


class ClipImageTower(nnx.Module):
    """CLIP's ViT on uint8 images (B, H, W, 3) -> (B, width) (class token after ln_post).

    The images are scaled to [0, 1] and normalised with CLIP's per-channel mean and std
    inside the model, so a batch holds 1 byte per pixel, as decoded (a float32 224² image
    would be 588 KiB per example). Layers: patch embedding (a conv without bias), class
    token, learned positions, ln_pre, ``layers`` scanned blocks, ln_post.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        *,
        remat: bool = False,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch={patch_size}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        p = patch_size
        self.patch = nnx.Conv(
            3, width, (p, p), strides=p, padding="VALID", use_bias=False,
            kernel_init=conv_kernel_init, **kw,
        )  # fmt: skip
        n = (image_size // p) ** 2 + 1
        init = nnx.initializers.normal(0.02)
        self.cls = nnx.Param(init(rngs.params(), (width,), param_dtype))
        self.pos = nnx.Param(init(rngs.params(), (n, width), param_dtype))
        self.ln_pre = nnx.LayerNorm(width, **kw)
        self.blocks = StackedBlocks(layers, width, heads, remat=remat, **kw)
        self.ln_post = nnx.LayerNorm(width, **kw)
        self.image_size = image_size
        self.compute_dtype = dtype
        self.features = width

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"images of shape {images.shape[1:]}; this tower takes "
                f"({self.image_size}, {self.image_size}, 3) uint8 pixels."
            )
        mean = jnp.asarray(CLIP_PIXEL_MEAN, jnp.float32)
        std = jnp.asarray(CLIP_PIXEL_STD, jnp.float32)
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        x = x.astype(self.compute_dtype or jnp.float32)
        x = self.patch(x)  # (B, H, W, 3) -> (B, H/p, W/p, width): p²·3 -> width per patch
        b, d = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(x.dtype)
        x = self.blocks(self.ln_pre(x))
        return self.ln_post(x[:, 0])


class ClipTextTower(nnx.Module):
    """CLIP's text transformer on int32 tokens (B, L) -> (B, width).

    Causal self-attention; the feature is the final-LN output at the end-of-text token,
    found as the position of the largest token id (CLIP's EOT has the largest id).
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        *,
        remat: bool = False,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, width, **kw)
        init = nnx.initializers.normal(0.01)
        self.pos = nnx.Param(init(rngs.params(), (context_length, width), param_dtype))
        self.blocks = StackedBlocks(layers, width, heads, causal=True, remat=remat, **kw)
        self.ln_final = nnx.LayerNorm(width, **kw)
        self.context_length = context_length
        self.features = width

    def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
        b, n = tokens.shape
        if n != self.context_length:
            raise ValueError(f"tokens of length {n}; this tower takes {self.context_length}.")
        x = self.embed(tokens)  # (B, L) -> (B, L, width)
        x = x + self.pos[...].astype(x.dtype)
        x = self.ln_final(self.blocks(x))
        return x[jnp.arange(b), jnp.argmax(tokens, axis=-1)]


def clip_config(name: str) -> ClipConfig:
    """The :class:`ClipConfig` called ``name`` (one of :data:`CLIP_CONFIGS`)."""
    if name not in CLIP_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CLIP_CONFIGS)}.")
    return CLIP_CONFIGS[name]


def clip_model(
    name: str,
    *,
    dtype: Dtype = jnp.bfloat16,
    param_dtype: Dtype = jnp.float32,
    remat: bool = False,
    init_temperature: float = CLIP_INIT_TEMPERATURE,
    init_bias: float | None = None,
    rngs: nnx.Rngs,
) -> DualEncoder:
    """The CLIP two-tower :class:`DualEncoder` called ``name``: bf16 compute, f32 parameters.

    Inputs are ``(images, tokens)``: uint8 (B, S, S, 3) and int32 (B, L) (see
    :func:`clip_input_spec`); outputs two (B, D) unit-norm float32 embeddings. The
    projections are linear without bias, as in CLIP, so the parameter counts are CLIP's:
    151,277,313 (ViT-B/32), 149,620,737 (ViT-B/16), 427,616,513 (ViT-L/14).

    Building a ViT-L's parameters takes a while on a CPU; for shapes only, build it under
    ``nnx.eval_shape``, which allocates nothing::

        model = nnx.eval_shape(lambda: clip_model("vit-l-14", rngs=nnx.Rngs(0)))
        n = sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    """
    c = clip_config(name)
    kw = dict(remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    image = ClipImageTower(
        c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_heads, **kw
    )
    text = ClipTextTower(
        c.vocab_size, c.context_length, c.text_width, c.text_layers, c.text_heads, **kw
    )
    return DualEncoder(
        image,
        text,
        embed_dim=c.embed_dim,
        init_temperature=init_temperature,
        init_bias=init_bias,
        head_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def clip_input_spec(
    name: str, batch: int, sharding: jax.sharding.Sharding | None = None
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract ``(images, tokens)`` of a global batch: uint8 (B, S, S, 3), int32 (B, L).

    Per example: S²·3 bytes of pixels (150,528 at 224) and 4·L bytes of tokens (308).
    """
    c = clip_config(name)
    s = c.image_size
    return (
        jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8, sharding=sharding),
        jax.ShapeDtypeStruct((batch, c.context_length), jnp.int32, sharding=sharding),
    )
