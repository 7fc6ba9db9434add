"""Dual encoders (flax NNX) for contrastive learning, and small encoders that run on a CPU.

A :class:`DualEncoder` maps a pair of inputs to a pair of L2-normalised embeddings
``(x, y)``, each [B, D], and carries the learnable temperature (log-parameterised, as in
CLIP and SigLIP) and, for the sigmoid loss, the learnable bias. Two configurations:

- one tower on two views (SimCLR): ``DualEncoder(tower)``; both views share the tower and
  the projection head;
- two towers (CLIP/SigLIP): ``DualEncoder(image_tower, text_tower)``.

No layer uses batch statistics (GroupNorm / LayerNorm only): gradient caching encodes the
batch in chunks, and BatchNorm would see a chunk rather than the batch. Dropout takes an
explicit PRNG key (``key=None`` turns it off), so that the re-encoding pass of gradient
caching can replay the same masks. The training code sees the model only through its
functional core: ``graphdef, params = nnx.split(model)`` and :func:`encode_fn`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import losses

Dtype = Any

__all__ = [
    "MLPEncoder",
    "ResNetEncoder",
    "ViTEncoder",
    "TextTransformer",
    "DualEncoder",
    "make_image_encoder",
    "encode_fn",
    "ClipConfig",
    "CLIP_CONFIGS",
    "StackedBlocks",
    "ClipImageTower",
    "ClipTextTower",
    "clip_config",
    "clip_model",
    "clip_input_spec",
    "IMAGE_ENCODERS",
    "CLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_BIAS",
]


def _loss_default(loss: Callable, argument: str) -> float:
    return inspect.signature(loss).parameters[argument].default


# The initial temperature and bias are the losses' own defaults (defined once, there).
CLIP_INIT_TEMPERATURE = _loss_default(losses.infonce, "temperature")  # 0.07, Radford et al.
SIGLIP_INIT_TEMPERATURE = _loss_default(losses.sigmoid, "temperature")  # 0.1, Zhai et al.
SIGLIP_INIT_BIAS = _loss_default(losses.sigmoid, "bias")  # -10

#: The bundled image encoders of :func:`make_image_encoder`, by name.
IMAGE_ENCODERS = ("mlp", "resnet", "vit")


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _conv_kernel_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32):
    """LeCun normal for a conv kernel (kh, kw, c_in, c_out), drawn as a (kh*kw*c_in, c_out)
    matrix (the same fan-in, so the same distribution): XLA on CPU compiles the 2-D random
    draw several times faster, which makes building the bundled models quick."""
    flat = (math.prod(shape[:-1]), shape[-1])
    return nnx.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when ``key`` is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class MLPEncoder(nnx.Module):
    """``depth`` x (Linear -> LayerNorm -> GELU -> dropout) on flat inputs [B, F] -> [B, width]."""

    def __init__(
        self,
        in_features: int,
        width: int = 256,
        depth: int = 2,
        *,
        dropout_rate: float = 0.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [in_features] + [width] * depth
        self.linears = nnx.List(
            [nnx.Linear(a, b, **kw) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.norms = nnx.List([nnx.LayerNorm(width, **kw) for _ in range(depth)])
        self.dropout_rate = dropout_rate
        self.features = width

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, (lin, norm) in enumerate(zip(self.linears, self.norms, strict=True)):
            x = lin(x)  # (B, F_in) · (F_in, width) -> (B, width)
            x = dropout(jax.nn.gelu(norm(x)), self.dropout_rate, _fold(key, i))
        return x


class _ResBlock(nnx.Module):
    """Basic residual block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, kw: dict, groups: int):
        kw = dict(kw, kernel_init=_conv_kernel_init)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, use_bias=False, **kw)
        norm_kw = {k: v for k, v in kw.items() if k != "kernel_init"}
        self.norm1 = nnx.GroupNorm(c_out, num_groups=min(groups, c_out), **norm_kw)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), use_bias=False, **kw)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=min(groups, c_out), **norm_kw)
        self.proj = (
            nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, **kw)
            if stride != 1 or c_in != c_out
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return jax.nn.relu(h + (x if self.proj is None else self.proj(x)))


class ResNetEncoder(nnx.Module):
    """Small ResNet with GroupNorm on images [B, H, W, C] -> [B, 4 * width] (mean-pooled)."""

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 16,
        blocks_per_stage: int = 1,
        *,
        groups: int = 8,
        dropout_rate: float = 0.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = nnx.Conv(
            in_channels, width, (3, 3), use_bias=False, kernel_init=_conv_kernel_init, **kw
        )
        self.stem_norm = nnx.GroupNorm(width, num_groups=min(groups, width), **kw)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(_ResBlock(c, c_out, stride, kw=kw, groups=groups))
                c = c_out
        self.blocks = nnx.List(blocks)
        self.dropout_rate = dropout_rate
        self.features = c

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return dropout(x, self.dropout_rate, key)


class _Block(nnx.Module):
    """Pre-LN transformer block: x + attn(LN x); x + MLP(LN x); dropout on both branches."""

    def __init__(self, width: int, heads: int, dropout_rate: float, kw: dict):
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads}.")
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, **kw)
        self.qkv = nnx.Linear(width, 3 * width, **kw)
        self.out = nnx.Linear(width, width, **kw)
        self.ln2 = nnx.LayerNorm(width, **kw)
        self.fc1 = nnx.Linear(width, 4 * width, **kw)
        self.fc2 = nnx.Linear(4 * width, width, **kw)
        self.dropout_rate = dropout_rate

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        key: jax.Array | None,
        *,
        causal: bool = False,
    ) -> jax.Array:
        b, n, d = x.shape
        dh = d // self.heads
        qkv = self.qkv(self.ln1(x))  # (b, n, d) · (d, 3d) -> (b, n, 3d)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.heads, dh), 3, axis=2)
        q, k, v = (t[:, :, 0].transpose(0, 2, 1, 3) for t in (q, k, v))  # (b, h, n, dh)
        # (b, h, n, dh) · (b, h, dh, n) -> (b, h, n, n)
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        s = s / math.sqrt(dh)
        if mask is not None:  # mask: (b, n) True for real tokens
            s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        if causal:  # token q attends to tokens k <= q only (CLIP's text transformer)
            s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        a = jnp.einsum("bhqk,bhkd->bhqd", p, v)  # (b, h, n, n) · (b, h, n, dh) -> (b, h, n, dh)
        a = self.out(a.transpose(0, 2, 1, 3).reshape(b, n, d))  # (b, n, d) · (d, d) -> (b, n, d)
        x = x + dropout(a, self.dropout_rate, _fold(key, 0))
        h = jax.nn.gelu(self.fc1(self.ln2(x)))  # (b, n, d) · (d, 4d) -> (b, n, 4d)
        h = self.fc2(h)  # (b, n, 4d) · (4d, d) -> (b, n, d)
        return x + dropout(h, self.dropout_rate, _fold(key, 1))


class ViTEncoder(nnx.Module):
    """Small vision transformer on images [B, H, W, C] -> [B, width] (class token)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        patch_size: int = 4,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        *,
        dropout_rate: float = 0.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch={patch_size}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        p = patch_size
        self.patch = nnx.Conv(
            in_channels,
            width,
            (p, p),
            strides=p,
            padding="VALID",
            kernel_init=_conv_kernel_init,
            **kw,
        )
        n = (image_size // p) ** 2 + 1
        init = nnx.initializers.normal(0.02)
        self.cls = nnx.Param(init(rngs.params(), (1, 1, width), param_dtype))
        self.pos = nnx.Param(init(rngs.params(), (1, n, width), param_dtype))
        self.blocks = nnx.List([_Block(width, heads, dropout_rate, kw) for _ in range(depth)])
        self.ln = nnx.LayerNorm(width, **kw)
        self.features = width

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = self.patch(x)  # (B, H, W, C) -> (B, H/p, W/p, width)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, None, _fold(key, i))
        return self.ln(x[:, 0])


class TextTransformer(nnx.Module):
    """Small text transformer on token ids [B, L] -> [B, width] (mean over non-pad tokens)."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        *,
        pad_id: int = 0,
        dropout_rate: float = 0.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, width, **kw)
        init = nnx.initializers.normal(0.02)
        self.pos = nnx.Param(init(rngs.params(), (1, max_len, width), param_dtype))
        self.blocks = nnx.List([_Block(width, heads, dropout_rate, kw) for _ in range(depth)])
        self.ln = nnx.LayerNorm(width, **kw)
        self.pad_id = pad_id
        self.max_len = max_len
        self.features = width

    def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
        b, n = tokens.shape
        if n > self.max_len:
            raise ValueError(f"text of length {n} exceeds max_len={self.max_len}.")
        mask = tokens != self.pad_id  # (B, L)
        x = self.embed(tokens)
        x = x + self.pos[...][:, :n].astype(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, _fold(key, i))
        x = self.ln(x).astype(jnp.float32)
        m = mask[..., None].astype(jnp.float32)
        return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


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
      head_bias: False gives a linear head without bias (CLIP's projections).
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
        head_bias: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.tower_x = tower_x
        self.tower_y = tower_y
        self.head_x = _Head(tower_x.features, embed_dim, head_hidden, kw, head_bias)
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

    @property
    def shared(self) -> bool:
        return self.tower_y is None

    def embed_x(self, inputs: Any, key: jax.Array | None = None) -> jax.Array:
        """[B, ...] inputs of the first kind -> [B, D] unit-norm float32 embeddings."""
        return _l2_normalize(self.head_x(self.tower_x(inputs, key)))

    def embed_y(self, inputs: Any, key: jax.Array | None = None) -> jax.Array:
        """[B, ...] inputs of the second kind (or second view) -> [B, D] embeddings."""
        if self.tower_y is None:
            return self.embed_x(inputs, key)
        return _l2_normalize(self.head_y(self.tower_y(inputs, key)))

    def __call__(self, batch: tuple[Any, Any], key: jax.Array | None = None):
        """``(inputs_x, inputs_y)`` -> ``(x, y)``, both [B, D]; the views get distinct keys."""
        inputs_x, inputs_y = batch
        return self.embed_x(inputs_x, _fold(key, 0)), self.embed_y(inputs_y, _fold(key, 1))

    def temperature(self) -> jax.Array:
        """tau = exp(-log_inv_temperature), float32 scalar."""
        t = self.log_inv_temperature[...]
        if not self.learn_temperature:
            t = jax.lax.stop_gradient(t)
        return jnp.exp(-t.astype(jnp.float32))

    def bias_value(self) -> jax.Array | None:
        return None if self.bias is None else self.bias[...].astype(jnp.float32)


def encode_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any, jax.Array | None], Any]:
    """The functional core: ``f(params, batch, key) -> (x, y)`` for ``nnx.split``'s graphdef."""

    def f(params: Any, batch: Any, key: jax.Array | None = None):
        return nnx.merge(graphdef, params)(batch, key)

    return f


def make_image_encoder(
    name: str,
    input_shape: Sequence[int],
    *,
    width: int | None = None,
    depth: int | None = None,
    dropout_rate: float = 0.0,
    dtype: Dtype = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A bundled encoder by name: ``"mlp"``, ``"resnet"`` or ``"vit"``.

    ``input_shape`` is one example's shape: (F,) for the MLP, (H, W, C) for the others.
    """
    kw = dict(dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
    if name == "mlp":
        return MLPEncoder(math.prod(input_shape), width or 256, depth or 2, **kw)
    if name in ("resnet", "vit") and len(input_shape) != 3:
        raise ValueError(f"{name} needs input_shape (H, W, C), got {tuple(input_shape)}.")
    if name == "resnet":
        return ResNetEncoder(input_shape[-1], width or 16, depth or 1, **kw)
    if name == "vit":
        h = input_shape[0]
        patch = 4 if h % 4 == 0 else (2 if h % 2 == 0 else 1)
        return ViTEncoder(h, input_shape[-1], patch, width or 64, depth or 2, **kw)
    raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(IMAGE_ENCODERS)}.")


# ---------------------------------------------------------------------------------------
# CLIP-sized two-tower models (Radford et al. 2021, "Learning Transferable Visual Models
# From Natural Language Supervision", Tables 19-20), for planning at scale.


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
        def make(r: nnx.Rngs) -> _Block:
            return _Block(width, heads, 0.0, dict(dtype=dtype, param_dtype=param_dtype, rngs=r))

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
            kernel_init=_conv_kernel_init, **kw,
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
