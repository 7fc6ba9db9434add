"""The single-device tiled losses against the dense reference: values, gradients, limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
from tests.loss_cases import (
    CASES,
    LOSSES,
    assert_close,
    assert_mix,
    block_sizes,
    case_id,
    check_against_dense,
    dense_value_and_grads,
    embeddings,
    hyper,
    options,
    oracle,
    record,
    temperatures,
    tiled_value_and_grads,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_tiled_matches_dense(name):
    """Drawn options, batches, dimensions, tilings and hyperparameters against the float64
    oracle; most examples have several tiles with a ragged last one (checked at the end)."""
    drawn = []

    @settings(max_examples=15, deadline=None)
    @given(
        opts=options(name),
        batch=st.integers(3, 160),
        dim=st.integers(1, 96),
        data=st.data(),
        temperature=temperatures,
        bias=st.floats(-12.0, 4.0),
        seed=st.integers(0, 2**16),
    )
    def check(opts, batch, dim, data, temperature, bias, seed):
        block = data.draw(block_sizes(batch), label="block_size")
        record(drawn, batch, block, case=case_id((name, opts)))
        x, y = embeddings(seed, batch, dim)
        check_against_dense(name, opts, x, y, hyper(name, temperature, bias), block_size=block)

    check()
    assert_mix(drawn, layout=("ragged", 0.2), tiles=("several", 0.4))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("batch,block", [(1, None), (7, 3), (129, 50)])
def test_every_option_and_ragged_blocks(case, batch, block):
    name, opts = case
    x, y = embeddings(batch, batch, 24)
    if name == "decoupled" and batch < 2:
        with pytest.raises(ValueError, match="at least 2 pairs"):
            losses.decoupled(x, y, block_size=block, **opts)
        return
    check_against_dense(name, opts, x, y, hyper(name, 0.1), block_size=block)


def test_unnormalised_inputs_and_python_float_hyperparameters():
    x, y = embeddings(3, 50, 16, normalise=False)
    for name, opts in CASES:
        f, r = getattr(losses, name), getattr(losses.reference, name)
        assert_close(f(x, y, block_size=16, **opts), r(x, y, **opts), rtol=1e-5, what=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_large_logits_match_float64(case):
    """|s| up to 1000: finite, and as accurate as the dense float32 computation."""
    name, opts = case
    x, y = embeddings(11, 96, 32)
    hp = hyper(name, 1e-3, bias=-5.0)  # normalised rows: |s| <= 1 / 0.001 = 1000
    v, g = tiled_value_and_grads(name, opts, x, y, hp, block_size=40)
    v32, g32 = dense_value_and_grads(name, opts, x, y, hp)
    v64, g64 = oracle(name, opts, x, y, hp)
    for a, a32, a64, what in zip(
        jax.tree.leaves((v, g)), jax.tree.leaves((v32, g32)), jax.tree.leaves((v64, g64)),
        ["value", "dx", "dy", *hp], strict=True,
    ):  # fmt: skip
        a, a32, a64 = (np.asarray(t, np.float64) for t in (a, a32, a64))
        assert np.all(np.isfinite(a)), f"{name} {what} not finite"
        scale = max(np.max(np.abs(a64)), 1e-30)
        err = np.max(np.abs(a - a64)) / scale
        err32 = np.max(np.abs(a32 - a64)) / scale
        # Float32 rounding of logits near 1000 bounds what any float32 method can reach.
        assert err <= max(4 * err32, 1e-5), f"{name} {what}: {err:.1e} vs dense {err32:.1e}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bfloat16_inputs_match_float32(case):
    name, opts = case
    x, y = embeddings(5, 200, 64, dtype=jnp.bfloat16)
    hp = hyper(name, 0.1)
    v, g = tiled_value_and_grads(name, opts, x, y, hp, block_size=64)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    # The float32 result on the same (bfloat16-representable) inputs.
    v32, g32 = dense_value_and_grads(name, opts, x.astype(jnp.float32), y.astype(jnp.float32), hp)
    eps = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7
    assert_close(v, v32, rtol=eps, what=f"{name} bf16 value")
    assert_close(g, g32, rtol=4 * eps, what=f"{name} bf16 gradients")


def test_default_block_gives_the_same_result_for_awkward_batches():
    # 1031 is prime: the default tiling pads a little and must mask the padding.
    x, y = embeddings(7, 1031, 8)
    for name, opts in [("infonce", {}), ("sigmoid", {}), ("decoupled", {"intra_view": True})]:
        check_against_dense(name, opts, x, y, hyper(name, 0.2))


ERRORS = [
    (lambda f: f(jnp.ones((4,)), jnp.ones((4,))), ValueError, r"shape \(batch, dim\).*\(4,\)"),
    (
        lambda f: f(jnp.ones((4, 3)), jnp.ones((4, 2))),
        ValueError,
        r"same shape.*\(4, 3\).*\(4, 2\)",
    ),
    (
        lambda f: f(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32)),
        TypeError,
        "floating-point",
    ),
    (
        lambda f: f(jnp.ones((4, 3)), jnp.ones((4, 3)), temperature=0.0),
        ValueError,
        "temperature must be > 0",
    ),
    (
        lambda f: f(jnp.ones((4, 3)), jnp.ones((4, 3)), temperature=-1),
        ValueError,
        "temperature must be > 0",
    ),
    (lambda f: f(jnp.ones((4, 3)), jnp.ones((4, 3)), block_size=0), ValueError, "block_size"),
    (
        lambda f: f(jnp.ones((4, 3)), jnp.ones((4, 3)), axis_name="data"),
        ValueError,
        "not a mesh axis",
    ),
]


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
@pytest.mark.parametrize("call,error,message", ERRORS)
def test_errors(name, call, error, message):
    with pytest.raises(error, match=message):
        call(getattr(losses, name))


def test_decoupled_needs_two_pairs():
    with pytest.raises(ValueError, match=r"at least 2 pairs.*\(1, 3\)"):
        losses.decoupled(jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        losses.decoupled(jnp.ones((4, 3)), jnp.ones((4, 3)), sigma=0.0)


MiB = 2**20


def _temp_bytes(fn, *specs) -> int:
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_memory_at_65k_pairs(case):
    """value_and_grad at B = 65,536, D = 256: <= 128 MiB of temporaries (dense: ~32 GiB)."""
    name, opts = case
    f = getattr(losses, name)
    spec = jax.ShapeDtypeStruct((65536, 256), jnp.float32)
    temp = _temp_bytes(jax.value_and_grad(lambda x, y: f(x, y, **opts), argnums=(0, 1)), spec, spec)
    assert temp <= 128 * MiB, f"{temp / MiB:.0f} MiB"


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
def test_memory_at_a_million_pairs(name):
    """value_and_grad at B = 1,048,576, D = 128: <= 576 MiB of temporaries."""
    f = getattr(losses, name)
    spec = jax.ShapeDtypeStruct((1 << 20, 128), jnp.float32)
    temp = _temp_bytes(jax.value_and_grad(lambda x, y: f(x, y), argnums=(0, 1)), spec, spec)
    assert temp <= 576 * MiB, f"{temp / MiB:.0f} MiB"


def test_dense_reference_memory_is_quadratic():
    """The check above can fail: the dense loss at B = 65,536 needs tens of GiB."""
    spec = jax.ShapeDtypeStruct((65536, 256), jnp.float32)
    fn = jax.value_and_grad(lambda x, y: losses.reference.infonce(x, y), argnums=(0, 1))
    assert _temp_bytes(fn, spec, spec) >= 16 * 2**30
