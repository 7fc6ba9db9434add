"""Small encoders that run on a CPU: an MLP, a GroupNorm ResNet, a ViT and a text transformer.

No layer uses batch statistics (GroupNorm / LayerNorm only): gradient caching encodes the
batch in chunks, and BatchNorm would see a chunk rather than the batch. Dropout takes an
explicit PRNG key (``key=None`` turns it off), so that the re-encoding pass of gradient
caching can replay the same masks. Every encoder has a ``features`` attribute (its output
width) and ``__call__(inputs, key=None) -> [B, features]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

__all__ = [
    "IMAGE_ENCODERS",
    "MLPEncoder",
    "ResNetEncoder",
    "ViTEncoder",
    "TextTransformer",
    "make_image_encoder",
    "dropout",
]

#: The bundled image encoders of :func:`make_image_encoder`, by name.
IMAGE_ENCODERS = ("mlp", "resnet", "vit")


def fold_key(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def conv_kernel_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32):
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
            x = dropout(jax.nn.gelu(norm(x)), self.dropout_rate, fold_key(key, i))
        return x


class _ResBlock(nnx.Module):
    """Basic residual block with GroupNorm: conv3x3-GN-ReLU-conv3x3-GN + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, kw: dict, groups: int):
        kw = dict(kw, kernel_init=conv_kernel_init)
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
            in_channels, width, (3, 3), use_bias=False, kernel_init=conv_kernel_init, **kw
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


class Block(nnx.Module):
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
        x = x + dropout(a, self.dropout_rate, fold_key(key, 0))
        h = jax.nn.gelu(self.fc1(self.ln2(x)))  # (b, n, d) · (d, 4d) -> (b, n, 4d)
        h = self.fc2(h)  # (b, n, 4d) · (4d, d) -> (b, n, d)
        return x + dropout(h, self.dropout_rate, fold_key(key, 1))


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
            kernel_init=conv_kernel_init,
            **kw,
        )
        n = (image_size // p) ** 2 + 1
        init = nnx.initializers.normal(0.02)
        self.cls = nnx.Param(init(rngs.params(), (1, 1, width), param_dtype))
        self.pos = nnx.Param(init(rngs.params(), (1, n, width), param_dtype))
        self.blocks = nnx.List([Block(width, heads, dropout_rate, kw) for _ in range(depth)])
        self.ln = nnx.LayerNorm(width, **kw)
        self.features = width

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = self.patch(x)  # (B, H, W, C) -> (B, H/p, W/p, width)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, None, fold_key(key, i))
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
        self.blocks = nnx.List([Block(width, heads, dropout_rate, kw) for _ in range(depth)])
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
            x = block(x, mask, fold_key(key, i))
        x = self.ln(x).astype(jnp.float32)
        m = mask[..., None].astype(jnp.float32)
        return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


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
