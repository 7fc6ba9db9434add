"""Dual encoders and the bundled encoders: shapes, normalisation, temperature, dropout keys."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contrastive import models

B, D = 6, 16


def _image_batch(shape, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (B, *shape)), jax.random.normal(k2, (B, *shape))


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (64,)), ("resnet", (8, 8, 3)), ("vit", (8, 8, 3))]
)
def test_bundled_encoders_give_unit_embeddings_chunk_independent(name, shape):
    rngs = nnx.Rngs(0)
    model = models.DualEncoder(
        models.make_image_encoder(name, shape, width=8 if name == "resnet" else None, rngs=rngs),
        embed_dim=D,
        rngs=rngs,
    )
    graphdef, params = nnx.split(model)
    encode = jax.jit(models.encode_fn(graphdef))
    batch = _image_batch(shape)
    x, y = encode(params, batch, None)
    assert x.shape == y.shape == (B, D) and x.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
    # No batch statistics anywhere: a row's embedding ignores the other rows (so chunking
    # cannot change it). Same shapes, one compilation: replace the last rows only.
    other = jax.tree_util.tree_map(lambda a, o: a.at[3:].set(o[3:]), batch, _image_batch(shape, 1))
    x_other, _ = encode(params, other, None)
    np.testing.assert_allclose(x_other[:3], x[:3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(x_other[3:], x[3:])
    # One tower for both views (SimCLR): the same input gives the same embedding.
    same, _ = encode(params, (batch[1], batch[0]), None)
    np.testing.assert_allclose(same, y, rtol=1e-5, atol=1e-6)


def test_image_text_two_towers_bf16_compute_f32_params():
    rngs = nnx.Rngs(0)
    image = models.ViTEncoder(8, 3, 4, 32, 1, 4, dtype=jnp.bfloat16, rngs=rngs)
    text = models.TextTransformer(50, 10, 32, 1, 4, dtype=jnp.bfloat16, rngs=rngs)
    model = models.DualEncoder(
        image,
        text,
        embed_dim=D,
        init_temperature=models.SIGLIP_INIT_TEMPERATURE,
        init_bias=models.SIGLIP_INIT_BIAS,
        dtype=jnp.bfloat16,
        rngs=rngs,
    )
    tokens = jnp.array([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]] * 3)
    graphdef, params = nnx.split(model)
    x, y = jax.jit(models.encode_fn(graphdef))(params, (jnp.ones((B, 8, 8, 3)), tokens), None)
    assert x.shape == y.shape == (B, D) and x.dtype == y.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    # SigLIP init: t' = log 10, b = -10.
    np.testing.assert_allclose(model.log_inv_temperature[...], math.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(model.temperature(), 0.1, rtol=1e-6)
    assert float(model.bias_value()) == -10.0


def test_clip_init_and_shared_tower_has_no_second_tower():
    rngs = nnx.Rngs(0)
    model = models.DualEncoder(models.MLPEncoder(4, 8, 1, rngs=rngs), rngs=rngs)
    np.testing.assert_allclose(model.temperature(), models.CLIP_INIT_TEMPERATURE, rtol=1e-6)
    assert model.shared and model.bias_value() is None
    _, params = nnx.split(model)
    assert set(params.keys()) == {"tower_x", "head_x", "log_inv_temperature"}


def test_dropout_follows_the_key():
    rngs = nnx.Rngs(0)
    tower = models.MLPEncoder(64, 32, 2, dropout_rate=0.5, rngs=rngs)
    model = models.DualEncoder(tower, embed_dim=D, head_hidden=32, rngs=rngs)
    graphdef, params = nnx.split(model)
    encode = jax.jit(models.encode_fn(graphdef))
    batch = _image_batch((64,))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b, c = encode(params, batch, k1), encode(params, batch, k1), encode(params, batch, k2)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[0], c[0])
    # Without a key, dropout is off and the views of one input agree.
    x, y = encode(params, (batch[0], batch[0]), None)
    np.testing.assert_array_equal(x, y)
    # With a key the two views get different masks.
    x, y = encode(params, (batch[0], batch[0]), k1)
    assert not np.allclose(x, y)


def test_bad_arguments_are_clear_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="unknown encoder"):
        models.make_image_encoder("vgg", (8, 8, 3), rngs=rngs)
    with pytest.raises(ValueError, match="input_shape"):
        models.make_image_encoder("resnet", (64,), rngs=rngs)
    with pytest.raises(ValueError, match="init_temperature"):
        models.DualEncoder(models.MLPEncoder(4, 8, 1, rngs=rngs), init_temperature=0.0, rngs=rngs)
    with pytest.raises(ValueError, match="multiple of heads"):
        models.ViTEncoder(8, 3, 4, 30, 1, 4, rngs=rngs)


# ----------------------------------------------------------------- CLIP-sized two towers

CLIP_PARAMS = {  # Radford et al. 2021; the released models' counts, logit scale included
    "vit-b-32": 151_277_313,
    "vit-b-16": 149_620_737,
    "vit-l-14": 427_616_513,
}


def _abstract_params(name):
    model = nnx.eval_shape(lambda: models.clip_model(name, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", list(CLIP_PARAMS))
def test_clip_configs_have_clip_parameter_counts_and_shapes(name):
    params = _abstract_params(name)  # nothing allocated: ShapeDtypeStructs
    leaves = jax.tree_util.tree_leaves(params)
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in leaves)
    assert {p.dtype for p in leaves} == {jnp.dtype(jnp.float32)}
    assert sum(p.size for p in leaves) == CLIP_PARAMS[name]
    c = models.clip_config(name)
    w, t = c.vision_width, c.text_width
    image, text = params["tower_x"], params["tower_y"]
    n = (c.image_size // c.patch_size) ** 2 + 1
    assert image["pos"].shape == (n, w)
    assert image["patch"]["kernel"].shape == (c.patch_size, c.patch_size, 3, w)
    # One stacked array per block parameter: (layers, ...).
    assert image["blocks"]["layers"]["qkv"]["kernel"].shape == (c.vision_layers, w, 3 * w)
    assert text["blocks"]["layers"]["fc1"]["kernel"].shape == (c.text_layers, t, 4 * t)
    assert text["embed"]["embedding"].shape == (c.vocab_size, t)
    assert text["pos"].shape == (c.context_length, t)
    # CLIP's projections: linear, no bias, to the shared embedding width.
    assert set(params["head_x"]["fc1"].keys()) == {"kernel"}
    assert params["head_x"]["fc1"]["kernel"].shape == (w, c.embed_dim)
    assert params["head_y"]["fc1"]["kernel"].shape == (t, c.embed_dim)


def _tiny_batch(seed=0):
    c = models.clip_config("vit-tiny")
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.randint(k1, (B, c.image_size, c.image_size, 3), 0, 256, jnp.int32)
    tokens = jax.random.randint(k2, (B, c.context_length), 1, c.vocab_size - 1, jnp.int32)
    tokens = tokens.at[:, 5].set(c.vocab_size - 1)  # end of text: the largest id, at 5
    return images.astype(jnp.uint8), tokens


def test_clip_tiny_embeds_uint8_images_and_tokens_causally():
    model = models.clip_model("vit-tiny", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    encode = jax.jit(models.encode_fn(graphdef))
    images, tokens = _tiny_batch()
    x, y = encode(params, (images, tokens), None)
    assert x.shape == y.shape == (B, models.clip_config("vit-tiny").embed_dim)
    assert x.dtype == y.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
    # Causal attention, pooled at the end-of-text token: tokens after it change nothing.
    later = tokens.at[:, 6:].set(7)
    _, y_later = encode(params, (images, later), None)
    np.testing.assert_array_equal(y_later, y)
    earlier = tokens.at[:, 2].set(7)
    assert not np.allclose(encode(params, (images, earlier), None)[1], y)
    with pytest.raises(ValueError, match="uint8 pixels"):
        encode(params, (images[:, :16], tokens), None)


@pytest.mark.slow
def test_stacked_blocks_equal_the_layers_applied_one_by_one_and_remat_changes_nothing():
    rngs = nnx.Rngs(0)
    stack = models.StackedBlocks(3, 16, 2, causal=True, rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    graphdef, stacked = nnx.split(stack.layers)
    h = x
    for i in range(3):
        layer = nnx.merge(graphdef, jax.tree_util.tree_map(lambda p, i=i: p[i], stacked))
        h = layer(h, None, None, causal=True)
    np.testing.assert_allclose(stack(x), h, rtol=1e-6, atol=1e-6)

    # Remat recomputes the same block in the backward pass: the same gradients.
    remat = models.StackedBlocks(3, 16, 2, causal=True, remat=True, rngs=nnx.Rngs(0))
    grads = [
        jax.jit(jax.grad(lambda p, g=g: jnp.sum(nnx.merge(g, p)(x) ** 2)))(p)
        for g, p in (nnx.split(stack), nnx.split(remat))
    ]
    for a, b in zip(*map(jax.tree_util.tree_leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clip_names_and_inputs_are_checked():
    with pytest.raises(ValueError, match="unknown model 'vit-h-14'"):
        models.clip_model("vit-h-14", rngs=nnx.Rngs(0))
    images, tokens = models.clip_input_spec("vit-b-16", 4)
    assert images.shape == (4, 224, 224, 3) and images.dtype == jnp.uint8
    assert tokens.shape == (4, 77) and tokens.dtype == jnp.int32


def test_inverse_temperature_ceiling_clamps_and_stops_the_gradient():
    """CLIP's clamp of 1/tau at 100: off by default; on, tau never falls below 1/ceiling, and
    past the ceiling the temperature parameter gets no gradient (it cannot run away)."""
    rngs = nnx.Rngs(0)
    tower = models.MLPEncoder(4, 8, 1, rngs=rngs)
    free = models.DualEncoder(tower, init_temperature=0.005, rngs=rngs)
    capped = models.DualEncoder(
        tower, init_temperature=0.005, max_inverse_temperature=100.0, rngs=rngs
    )
    np.testing.assert_allclose(free.temperature(), 0.005, rtol=1e-6)
    np.testing.assert_allclose(capped.temperature(), 0.01, rtol=1e-6)

    def grad_of(model):
        graphdef, params = nnx.split(model)
        return jax.grad(lambda p: nnx.merge(graphdef, p).temperature())(params)

    assert float(grad_of(capped)["log_inv_temperature"][...]) == 0.0
    assert float(grad_of(free)["log_inv_temperature"][...]) != 0.0
    below = models.DualEncoder(tower, init_temperature=0.05, max_inverse_temperature=100.0,
                               rngs=rngs)  # fmt: skip
    np.testing.assert_allclose(below.temperature(), 0.05, rtol=1e-6)  # under it: unchanged
    assert float(grad_of(below)["log_inv_temperature"][...]) != 0.0
    with pytest.raises(ValueError, match="max_inverse_temperature must be > 0"):
        models.DualEncoder(tower, max_inverse_temperature=0.0, rngs=rngs)
