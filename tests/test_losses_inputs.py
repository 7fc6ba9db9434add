"""Inputs that never crash: odd dtypes and containers work or fail with a one-line error
that names the argument; traced hyperparameters are checked under ``checkify``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

import losses
from tests.loss_cases import CASES, assert_close, check_against_dense, embeddings, hyper
from tests.test_losses_ring import data_mesh

NAMES = ["infonce", "sigmoid", "decoupled"]


ONE_TILE_OR_MORE = [(8, None), (64, None), (256, None), (64, 64), (64, 32)]


@pytest.mark.parametrize(
    "name,batch,block",
    [("infonce", b, k) for b, k in ONE_TILE_OR_MORE]
    + [(name, 64, None) for name in ("sigmoid", "decoupled")],
)
def test_bfloat16_gradients_with_one_tile_or_more(name, batch, block):
    """One tile per block used to reach XLA:CPU's library matmul with bfloat16 operands."""
    x, y = embeddings(batch, batch, 16, dtype=jnp.bfloat16)
    f = getattr(losses, name)
    grad = jax.jit(jax.grad(lambda a, b: f(a, b, block_size=block), argnums=(0, 1)))
    dx, dy = grad(x, y)
    assert dx.dtype == dy.dtype == jnp.bfloat16
    want = jax.grad(lambda a, b: f(a, b), argnums=(0, 1))(
        x.astype(jnp.float32), y.astype(jnp.float32)
    )
    assert_close((dx, dy), want, rtol=4 * float(jnp.finfo(jnp.bfloat16).eps), what=name)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_inputs_outside_jit(name):
    x, y = (np.asarray(a) for a in embeddings(1, 24, 8))
    f = getattr(losses, name)
    want = f(jnp.asarray(x), jnp.asarray(y), block_size=8)
    assert_close(f(x, y, block_size=8), want, rtol=1e-6, what=name)
    valid, ids = np.arange(24) % 7 != 0, np.arange(24) // 3
    got = f(x, y, valid=valid, ids=ids, block_size=8)
    assert_close(got, f(x, y, valid=jnp.asarray(valid), ids=jnp.asarray(ids)), rtol=1e-6)
    g = jax.grad(lambda a: f(a, y, temperature=np.float32(0.2)))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g))


def test_block_size_accepts_numpy_integers():
    x, y = embeddings(2, 20, 8)
    assert_close(
        losses.infonce(x, y, block_size=np.int64(4)), losses.infonce(x, y, block_size=4), rtol=0
    )


X = jnp.ones((4, 3))
BAD_INPUTS = [
    # (kwargs or (x, y), error, message): every message names the argument.
    ({"bias": jnp.ones((8,))}, ValueError, r"bias must be a scalar.*\(8,\)"),
    ({"bias": jnp.ones((3,))}, ValueError, r"bias must be a scalar.*\(3,\)"),
    ({"bias": None}, TypeError, "bias must be a float"),
    ({"bias": float("inf")}, ValueError, "bias must be finite"),
    ({"temperature": "0.1"}, TypeError, "temperature must be a float"),
    ({"temperature": None}, TypeError, "temperature must be a float"),
    ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"temperature": np.float32(-0.5)}, ValueError, "temperature must be > 0"),
    ({"temperature": jnp.ones((2,))}, ValueError, r"temperature must be a scalar.*\(2,\)"),
    ({"block_size": True}, TypeError, "block_size must be a positive int"),
    ({"block_size": 2.0}, TypeError, "block_size must be a positive int"),
    ({"block_size": -3}, ValueError, "block_size must be a positive int"),
    ({"valid": jnp.ones((4,), jnp.int32)}, TypeError, "valid must be a bool array"),
    ({"valid": jnp.ones((5,), bool)}, ValueError, r"valid must have shape \(4,\)"),
    ({"ids": jnp.ones((4,))}, TypeError, "ids must be an integer array"),
    ({"ids": jnp.ones((4, 1), jnp.int32)}, ValueError, r"ids must have shape \(4,\)"),
    ((jnp.ones((4, 0)), jnp.ones((4, 0))), ValueError, r"no features \(D = 0\)"),
    ((X.astype(jnp.float16), X.astype(jnp.float16)), TypeError, "x has dtype float16"),
    ((X, X.astype(jnp.bfloat16)), TypeError, "y has dtype|same dtype"),
    ((jnp.ones((5, 3)), X), ValueError, "y must have at least as many rows as x"),
    ((X.astype(jnp.int32), X), TypeError, "x must be a floating-point array"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad,error,message", BAD_INPUTS)
def test_bad_inputs_raise_one_line_errors(name, bad, error, message):
    f = getattr(losses, name)
    if isinstance(bad, tuple):
        call = lambda: f(*bad)
    elif "bias" in bad and name != "sigmoid":
        return  # only the sigmoid loss has a bias
    else:
        call = lambda: f(X, X, **bad)
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(name)


def test_intra_view_needs_no_extra_negatives():
    with pytest.raises(ValueError, match="intra_view=True needs x and y of the same shape"):
        losses.infonce(X, jnp.ones((6, 3)), intra_view=True)


@pytest.mark.parametrize("name", NAMES)
def test_traced_hyperparameters_are_checked_under_checkify(name):
    """Traced temperature <= 0 or NaN, sigma = 0, or a NaN bias: reported by checkify;
    without checkify the checks cost nothing and the loss runs as before."""
    x, y = embeddings(0, 16, 8)
    f = getattr(losses, name)
    extra = {"decoupled": {"sigma": 1.0}, "sigmoid": {"bias": -1.0}}.get(name, {})

    def loss(t, s, b):
        kw = {"sigma": s} if name == "decoupled" else {}
        if name == "sigmoid":
            kw["bias"] = b
        return f(x, y, temperature=t, block_size=8, **kw)

    checked = jax.jit(checkify.checkify(jax.value_and_grad(loss)))
    err, _ = checked(0.1, 1.0, -1.0)
    err.throw()  # good values pass
    for t in (-0.1, 0.0, float("nan")):
        err, _ = checked(t, 1.0, -1.0)
        with pytest.raises(checkify.JaxRuntimeError, match=f"{name}: temperature must be"):
            err.throw()
    if name == "decoupled":
        err, _ = checked(0.1, 0.0, -1.0)
        with pytest.raises(checkify.JaxRuntimeError, match="decoupled: sigma must be"):
            err.throw()
    if name == "sigmoid":
        err, _ = checked(0.1, 1.0, float("nan"))
        with pytest.raises(checkify.JaxRuntimeError, match="sigmoid: bias must be finite"):
            err.throw()
    # Without checkify: no error, the value of the unchecked computation.
    value = jax.jit(loss)(0.1, 1.0, -1.0)
    assert_close(value, f(x, y, temperature=0.1, **extra), rtol=1e-6, what=name)


def test_checkify_inside_shard_map():
    mesh = data_mesh(4)
    x, y = embeddings(1, 16, 8)
    sm = jax.shard_map(
        lambda x, y, t: losses.infonce(x, y, temperature=t, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=P(),
    )
    checked = jax.jit(checkify.checkify(sm))
    checked(x, y, jnp.float32(0.1))[0].throw()
    with pytest.raises(checkify.JaxRuntimeError, match="temperature must be finite and > 0"):
        checked(x, y, jnp.float32(-1.0))[0].throw()


def test_the_forms_for_other_backends_match_dense(monkeypatch):
    """The GPU/TPU tile forms (jax.nn.softplus, Gᵀ·a contracted directly), traced on CPU."""
    from losses import _tiles

    monkeypatch.setattr(_tiles, "_on_cpu", lambda: False)
    x, y = embeddings(9, 21, 12)
    for name, opts in CASES[::4]:
        check_against_dense(name, opts, x, y, hyper(name, 0.3, -2.0), block_size=8)
    xb, yb = (a.astype(jnp.bfloat16) for a in (x, y))
    dx, dy = jax.grad(lambda a, b: losses.infonce(a, b, block_size=8), argnums=(0, 1))(xb, yb)
    assert dx.dtype == dy.dtype == jnp.bfloat16
