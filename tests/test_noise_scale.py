"""The gradient noise scale (McCandlish et al. 2018): exact two-size formulas, convergence on a
problem with a closed-form answer, the meter, the contrastive measurement, bad input."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import losses
from contrastive import noise_scale as ns
from contrastive.configs import LossConfig, OptimConfig, TrainConfig
from contrastive.mesh import make_mesh, shard_batch
from contrastive.models import DualEncoder, MLPEncoder
from contrastive.optim import make_optimizer
from contrastive.train_step import (
    Batch,
    create_train_state,
    local_loss_and_grads,
    make_train_step,
    place_state,
)

EPS64 = np.finfo(np.float64).eps


# Zero or well inside float64's normal range (relative rounding bounds fail for subnormals).
NORMS = st.one_of(st.just(0.0), st.floats(1e-6, 1e3))


@given(
    g2=NORMS,
    trace=NORMS,
    b_small=st.integers(1, 10_000),
    extra=st.integers(1, 10_000),
)
def test_two_size_formulas_are_exact_on_exact_expectations(g2, trace, b_small, extra):
    b_big = b_small + extra
    e_small = g2 + trace / b_small  # E|G_b|^2 = |G|^2 + tr(Sigma) / b
    e_big = g2 + trace / b_big
    g2_hat, trace_hat = ns.noise_scale_estimates(e_small, b_small, e_big, b_big)
    # Float64 rounding only: each input carries a relative error of about eps, and the
    # formulas multiply the absolute error of a difference by B / (B - b) (for |G|^2) and
    # b B / (B - b) (for the trace); 8 eps covers the few roundings of each step.
    scale = e_small + e_big
    assert abs(g2_hat - g2) <= 8 * EPS64 * scale * b_big / (b_big - b_small)
    assert abs(trace_hat - trace) <= 8 * EPS64 * scale * b_small * b_big / (b_big - b_small)


def _quadratic_problem(seed: int, dim: int):
    """Per-example loss 1/2 |theta - x_i|^2 with x_i ~ N(mu, diag(s^2)).

    Per-example gradient theta - x_i: the true gradient is G = theta - mu and the
    per-example covariance diag(s^2), so |G|^2 = sum (theta - mu)^2, tr(Sigma) = sum s^2.
    """
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=dim)
    s = rng.uniform(0.5, 2.0, size=dim)
    offset = rng.choice([-1.0, 1.0], size=dim) * rng.uniform(2.0, 3.0, size=dim)
    theta = jnp.asarray(mu + offset, jnp.float32)
    return theta, mu, s, offset


def _mean_loss_grad(theta, x):
    # grad of (1/b) sum_i 1/2 |theta - x_i|^2 over the rows of x [b, d]
    return jax.grad(lambda t: 0.5 * jnp.mean(jnp.sum((t - x) ** 2, axis=-1)))(theta)


@settings(max_examples=10)  # one compilation per example
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 12),
    b_small=st.integers(1, 8),
    k=st.integers(2, 6),
)
def test_meter_converges_to_the_closed_form_noise_scale(seed, dim, b_small, k):
    """Derivation of the tolerance.

    Per draw, the k sub-batch gradients z_i = theta - mean(x of sub-batch i) are
    independent N(m, diag(v / b)), m = theta - mu, v = s^2, b = b_small, and the big one is
    their mean zbar ~ N(m, diag(v / B)), B = k b. Per coordinate j the scatter
    sum_i (z_ij - zbar_j)^2 ~ (v_j / b) chi2_{k-1}, independent of zbar (Gaussian
    samples). With S = mean_i |z_i|^2, T = |zbar|^2 and D = S - T:

      trace_hat = D / (1/b - 1/B) = (1/(k-1)) sum_j v_j chi2_{k-1,j}
                  mean sum_j v_j, variance 2 sum_j v_j^2 / (k - 1);
      g2_hat    = (B T - b S) / (B - b) = T - D / (k - 1)
                  mean |m|^2, variance sum_j [2 (v_j/B)^2 k/(k-1) + 4 m_j^2 v_j / B]
                  (Var |N(m, c)|^2 = 2 c^2 + 4 m^2 c per coordinate, plus Var D/(k-1)^2).

    The meter averages R independent draws, so each average is within 5 standard
    deviations sqrt(var / R) of its mean except with probability 6e-7 (normal tail; R is
    large enough for the central limit theorem at these sizes). B_simple = trace/g2 then
    lies in [(tr - e_t)/(g2 + e_g), (tr + e_t)/(g2 - e_g)] (g2 > e_g by the choice of m).
    """
    draws = 4000
    theta, mu, s, offset = _quadratic_problem(seed, dim)
    big = b_small * k
    x = mu + s * np.random.default_rng([seed, 1]).normal(size=(draws, big, dim))

    def measure(xb, mode):
        return ns.measure_sq_norms(_mean_loss_grad, theta, xb, num_splits=k, big_batch=mode)

    def feed(meter, sq):
        return meter.update(sq[0], b_small, sq[1], big), None

    @jax.jit
    def run(x):
        small, full = jax.vmap(lambda xb: measure(xb, "full"))(x)
        _, mean_of_splits = jax.vmap(lambda xb: measure(xb, "mean_of_splits"))(x)
        meter, _ = jax.lax.scan(feed, ns.NoiseScaleMeter.init(), (small, full))
        return small, full, mean_of_splits, meter

    small, full, mean_of_splits, meter = run(jnp.asarray(x, jnp.float32))
    # For a mean of independent per-example terms the full-batch gradient is the mean of
    # the sub-batch gradients: both ways of measuring |G_big|^2 agree.
    np.testing.assert_allclose(mean_of_splits, full, rtol=2e-5, atol=1e-6)
    assert int(meter.count) == draws
    g2_each, trace_each = ns.noise_scale_estimates(
        np.asarray(small, np.float64), b_small, np.asarray(full, np.float64), big
    )
    g2_avg, trace_avg = meter.estimates()
    # The float32 running sums agree with float64 means of the per-draw estimates.
    spread_g, spread_t = np.abs(g2_each).mean(), np.abs(trace_each).mean()
    assert abs(float(g2_avg) - g2_each.mean()) <= 1e-4 * spread_g
    assert abs(float(trace_avg) - trace_each.mean()) <= 1e-4 * spread_t

    v = s**2
    g2_true, trace_true = float(np.sum(offset**2)), float(np.sum(v))
    var_trace = 2 * np.sum(v**2) / (k - 1)
    var_g2 = np.sum(2 * (v / big) ** 2 * k / (k - 1) + 4 * offset**2 * v / big)
    e_t = 5 * math.sqrt(var_trace / draws)
    e_g = 5 * math.sqrt(var_g2 / draws)
    assert abs(float(trace_avg) - trace_true) <= e_t, (float(trace_avg), trace_true, e_t)
    assert abs(float(g2_avg) - g2_true) <= e_g, (float(g2_avg), g2_true, e_g)
    assert e_g < g2_true
    b_simple = float(meter.b_simple())
    lo, hi = (trace_true - e_t) / (g2_true + e_g), (trace_true + e_t) / (g2_true - e_g)
    assert lo <= b_simple <= hi, (b_simple, lo, hi, trace_true / g2_true)


def test_meter_ema_is_the_bias_corrected_weighted_mean():
    rng = np.random.default_rng(0)
    small = rng.uniform(2.0, 3.0, size=7)
    big = rng.uniform(1.0, 2.0, size=7)
    decay = 0.8
    update = jax.jit(lambda m, a, b: m.update(a, 4, b, 16, decay=decay))
    meter = ns.NoiseScaleMeter.init()
    assert np.isnan(float(meter.b_simple()))
    for a, b in zip(small, big, strict=True):
        meter = update(meter, a, b)
    g2_each, trace_each = ns.noise_scale_estimates(small, 4, big, 16)
    w = decay ** np.arange(6, -1, -1)  # the last measurement has weight 1
    g2, trace = meter.estimates()
    np.testing.assert_allclose(float(g2), np.sum(w * g2_each) / np.sum(w), rtol=1e-5)
    np.testing.assert_allclose(float(trace), np.sum(w * trace_each) / np.sum(w), rtol=1e-5)
    result = meter.result()
    np.testing.assert_allclose(result.b_simple, float(trace) / float(g2), rtol=1e-6)
    assert len(jax.tree_util.tree_leaves(meter)) == 4


def _contrastive_grad(w, batch):
    """Gradient of the CLIP loss of a linear image map ``w`` on the rows it is given."""
    x, y = batch

    def loss(w_):
        zx = x @ w_  # (b, d) · (d, d) -> (b, d)
        zx = zx / jnp.linalg.norm(zx, axis=1, keepdims=True)
        zy = y / jnp.linalg.norm(y, axis=1, keepdims=True)
        return losses.infonce(zx, zy, temperature=0.2)

    return jax.grad(loss)(w)


def test_contrastive_sub_batches_see_only_their_own_negatives():
    rng = np.random.default_rng(1)
    b, d, k = 24, 6, 4
    m = b // k
    x = rng.normal(size=(b, d)).astype(np.float32)
    y = (x + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
    w = jnp.asarray(np.eye(d) + 0.3 * rng.normal(size=(d, d)), jnp.float32)

    @jax.jit
    def run(w, x, y):
        sub_x, sub_y = x.reshape(k, m, d), y.reshape(k, m, d)
        alone = jax.vmap(lambda bx, by: _contrastive_grad(w, (bx, by)))(sub_x, sub_y)
        full = _contrastive_grad(w, (x, y))
        measured = ns.measure_sq_norms(_contrastive_grad, w, (x, y), num_splits=k)
        mean_big = ns.measure_sq_norms(
            _contrastive_grad, w, (x, y), num_splits=k, big_batch="mean_of_splits"
        )[1]
        return alone, full, measured, mean_big

    alone, full, (small, big), mean_big = jax.device_get(run(w, x, y))
    np.testing.assert_allclose(small, np.mean(np.sum(alone**2, axis=(1, 2))), rtol=1e-5)
    np.testing.assert_allclose(big, np.sum(full**2), rtol=1e-5)
    # The negatives couple the rows: the full-batch gradient is not the mean of the
    # sub-batch gradients, so "mean_of_splits" measures something else here.
    np.testing.assert_allclose(mean_big, np.sum(np.mean(alone, axis=0) ** 2), rtol=1e-5)
    assert not np.isclose(mean_big, big, rtol=1e-3)
    # The same measurement from gradients computed elsewhere.
    est = ns.noise_scale_from_grads(list(alone), full, b_small=m)
    g2, trace = ns.noise_scale_estimates(small, m, big, b)
    np.testing.assert_allclose(est.g2, g2, rtol=1e-4)
    np.testing.assert_allclose(est.trace, trace, rtol=1e-4)
    np.testing.assert_allclose(est.b_simple, trace / g2, rtol=1e-4)


def test_measure_works_on_pytrees_and_batch_namedtuples():
    params = {"a": jnp.ones(3), "b": jnp.full((2, 2), 0.5)}
    batch = Batch(jnp.arange(24.0).reshape(8, 3), jnp.arange(8.0))

    def grad_fn(p, bt):
        return jax.grad(
            lambda q: jnp.mean(bt.x @ q["a"] * bt.y) + jnp.sum(q["b"] ** 2) * jnp.mean(bt.y)
        )(p)

    @jax.jit
    def run(params, batch):
        halves = [
            jax.tree_util.tree_map(lambda a, i=i: a[4 * i : 4 * i + 4], batch) for i in (0, 1)
        ]
        expect_small = sum(ns.sq_norm(grad_fn(params, h)) for h in halves) / 2
        expect_big = ns.sq_norm(grad_fn(params, batch))
        return ns.measure_sq_norms(grad_fn, params, batch, num_splits=2), (expect_small, expect_big)

    (small, big), (expect_small, expect_big) = run(params, batch)
    np.testing.assert_allclose(small, expect_small, rtol=1e-6)
    np.testing.assert_allclose(big, expect_big, rtol=1e-6)


def _small_dual_encoder():
    rngs = nnx.Rngs(0)
    model = DualEncoder(
        MLPEncoder(6, 8, 1, rngs=rngs), MLPEncoder(5, 8, 1, rngs=rngs), embed_dim=4, rngs=rngs
    )
    return nnx.split(model)


@pytest.mark.parametrize(
    ("devices", "splits", "chunk"), [(1, 4, None), (2, 2, 4), (4, 1, None), (8, 1, 8)]
)
def test_noise_probe_is_the_mean_over_sub_batches_alone(devices, splits, chunk):
    graphdef, params = _small_dual_encoder()
    cfg = TrainConfig(loss=LossConfig("infonce"), chunk_size=chunk)
    rng = np.random.default_rng(devices)
    b = 16
    x = rng.normal(size=(b, 6)).astype(np.float32)
    y = rng.normal(size=(b, 5)).astype(np.float32)
    mesh = make_mesh(num_devices=devices)
    probe = ns.make_noise_probe(graphdef, cfg, mesh, splits_per_device=splits)
    got = float(probe(params, shard_batch((x, y), mesh)))

    plain = TrainConfig(loss=LossConfig("infonce"))  # no chunks: the same gradient

    @jax.jit
    def sub_sq_norm(p, bx, by):
        _, g = local_loss_and_grads(
            p, (bx, by), None, graphdef=graphdef, config=plain, axis_name=None
        )
        return ns.sq_norm(g)

    m = b // (devices * splits)
    expect = np.mean(
        [float(sub_sq_norm(params, x[i : i + m], y[i : i + m])) for i in range(0, b, m)]
    )
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    with pytest.raises(ValueError, match=f"does not split into {devices} devices x {splits}"):
        probe(params, (x[: devices * splits + 1], y[: devices * splits + 1]))


def test_step_grad_norm_is_the_big_batch_norm_the_probe_pairs_with():
    """The recipe: |G_big|^2 = the step's grad_norm^2, at the parameters before the step."""
    graphdef, params = _small_dual_encoder()
    cfg = TrainConfig(loss=LossConfig("infonce"), optim=OptimConfig(clip_norm=1e-3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.normal(size=(16, 5)).astype(np.float32)
    mesh = make_mesh(num_devices=2)
    _, grads = jax.jit(
        lambda p: local_loss_and_grads(
            p, (x, y), None, graphdef=graphdef, config=cfg, axis_name=None
        )
    )(params)
    _, state = create_train_state(nnx.merge(graphdef, params), make_optimizer(cfg.optim))
    step = make_train_step(graphdef, cfg, mesh)
    _, metrics = step(place_state(state, mesh), shard_batch((x, y), mesh), None)
    # Before clipping (clip_norm is tiny here, so a clipped norm would show).
    np.testing.assert_allclose(
        float(metrics["grad_norm"]) ** 2, float(ns.sq_norm(grads)), rtol=1e-4
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ns.noise_scale_estimates(1.0, 8, 1.0, 8),
            "b_small=8 must be smaller than b_big=8",
        ),
        (lambda: ns.noise_scale_estimates(1.0, 16, 1.0, 8), "must be smaller than b_big=8"),
        (lambda: ns.noise_scale_estimates(1.0, 0, 1.0, 8), "b_small must be a positive batch"),
        (lambda: ns.noise_scale_estimates(1.0, -4, 1.0, 8), "b_small must be a positive batch"),
        (lambda: ns.noise_scale_estimates(1.0, 2, 1.0, math.inf), "b_big must be a positive"),
        (lambda: ns.noise_scale_estimates(1.0, True, 1.0, 8), "b_small must be a Python number"),
        (
            lambda: ns.noise_scale_estimates(1.0, jnp.int32(2), 1.0, 8),
            "b_small must be a Python number",
        ),
        (lambda: ns.NoiseScaleMeter.init().update(1.0, 2, 1.0, 8, decay=0.0), "decay must"),
        (lambda: ns.NoiseScaleMeter.init().update(1.0, 2, 1.0, 8, decay=1.5), "decay must"),
        (
            lambda: ns.NoiseScaleMeter.init().update(jnp.ones(2), 2, jnp.ones(2), 8),
            "scalar squared norms",
        ),
        (
            lambda: ns.measure_sq_norms(
                _mean_loss_grad, jnp.ones(2), jnp.ones((8, 2)), num_splits=1
            ),
            "num_splits must be an integer >= 2",
        ),
        (
            lambda: ns.measure_sq_norms(
                _mean_loss_grad, jnp.ones(2), jnp.ones((9, 2)), num_splits=2
            ),
            "a batch of 9 rows does not split into 2",
        ),
        (
            lambda: ns.measure_sq_norms(
                _mean_loss_grad, jnp.ones(2), (jnp.ones((8, 2)), jnp.ones((16, 2))), num_splits=2
            ),
            "same leading .* got sizes 16, 8",
        ),
        (
            lambda: ns.measure_sq_norms(
                _mean_loss_grad, jnp.ones(2), jnp.ones((8, 2)), num_splits=2, big_batch="mean"
            ),
            "big_batch must be",
        ),
        (lambda: ns.noise_scale_from_grads([], jnp.ones(2), b_small=2), "g_small_list is empty"),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_docstring_examples():
    result = doctest.testmod(ns, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
