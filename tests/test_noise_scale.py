"""The gradient noise scale (McCandlish et al. 2018) at the run's own batch size: float32
accumulation of bfloat16 gradients, the closed-form answer of a Gaussian problem, the
per-example split of the three losses on 1, 2 and 8 devices with and without the gradient
cache, B V constant in B on a trained checkpoint, the training loop's meter and its resume,
bad input."""

from __future__ import annotations

import doctest
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contrastive.configs import ConfigError, LossConfig, OptimConfig, TrainConfig, parse_config
from contrastive.data import prepare_digits
from contrastive.measure import noise_scale as ns
from contrastive.measure import per_example_noise as pe
from contrastive.mesh import make_mesh, shard_batch
from contrastive.models import DualEncoder, MLPEncoder
from contrastive.run import loop
from contrastive.run.noise_meter import measure_checkpoint
from contrastive.step.optim import make_optimizer
from contrastive.step.step_loss import make_loss_fn
from contrastive.step.train_step import (
    create_train_state,
    local_loss_and_grads,
    make_train_step,
    place_state,
    tower_fns,
)

# ------------------------------------------------------------------------ precision


def test_sq_norm_of_bfloat16_gradients_accumulates_in_float32():
    rng = np.random.default_rng(0)
    tree = {
        "w": jnp.asarray(rng.normal(size=(64, 257)), jnp.bfloat16),
        "b": jnp.asarray(1.0 + rng.uniform(size=4099) / 64, jnp.bfloat16),
    }
    exact = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in tree.values())
    got = ns.sq_norm(tree)
    assert got.dtype == jnp.float32
    assert abs(float(got) - exact) <= 1e-6 * exact
    # A result held in bfloat16 (8 bits of mantissa) is off by far more.
    in_bf16 = sum(float(jnp.sum(jnp.square(a)).astype(jnp.bfloat16)) for a in tree.values())
    assert abs(in_bf16 - exact) > 1e-5 * exact


def test_variance_of_bfloat16_gradients_is_exact_where_a_bfloat16_difference_is_not():
    """g_j = mu + e_j, |mu| >> |e_j| (the estimator's hard case: V is a small difference of
    large squared norms), every value exactly a bfloat16. The float64 answer on those very
    values is the truth; the float32 Welford sum reaches it to rounding."""
    rng = np.random.default_rng(1)
    m, d = 40, 3000
    mu = 1.0 + np.round(rng.uniform(size=d) * 8) / 8  # exact in bfloat16
    noise = np.round(rng.normal(size=(m, d)) * 16) / 1024  # multiples of 2^-10, |e| < 2^-4
    grads = np.asarray(jnp.asarray(mu + noise, jnp.bfloat16), np.float64)
    gbar = grads.mean(0)
    v_exact = np.sum((grads - gbar) ** 2) / (m - 1)
    est = ns.fixed_batch_noise_scale(
        lambda g: g, iter(jnp.asarray(grads, jnp.bfloat16)), batch_size=8, num_batches=m
    )
    assert abs(est.variance - v_exact) <= 1e-5 * v_exact
    assert abs(est.mean_sq_norm - np.sum(gbar**2)) <= 1e-6 * np.sum(gbar**2)
    # The shortcut mean|g_j|^2 - |gbar|^2 with squared norms rounded to bfloat16 loses V.
    sq = [
        float(jnp.sum(jnp.square(jnp.asarray(g, jnp.bfloat16))).astype(jnp.bfloat16)) for g in grads
    ]
    shortcut = (np.mean(sq) - float(jnp.asarray(np.sum(gbar**2), jnp.bfloat16))) * m / (m - 1)
    assert abs(shortcut - v_exact) > 0.5 * v_exact


def test_helmert_terms_sum_to_the_two_pass_scatter():
    rng = np.random.default_rng(2)
    trees = [{"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5) + 3.0} for _ in range(9)]
    trees = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), trees)
    est = ns.fixed_batch_noise_scale(lambda t: t, iter(trees), batch_size=4, num_batches=9)
    flat = np.stack([np.concatenate([np.ravel(t["a"]), t["b"]]) for t in trees]).astype(np.float64)
    scatter = np.sum((flat - flat.mean(0)) ** 2)
    assert len(est.terms) == 8
    np.testing.assert_allclose(est.sq_dev_sum, scatter, rtol=1e-5)
    np.testing.assert_allclose(est.mean_sq_norm, np.sum(flat.mean(0) ** 2), rtol=1e-6)
    np.testing.assert_allclose(est.g2, np.sum(flat.mean(0) ** 2) - scatter / 8 / 9, rtol=1e-5)
    np.testing.assert_allclose(est.b_simple, 4 * (scatter / 8) / est.g2, rtol=1e-6)


# --------------------------------------------------------------------- the closed form


def test_fixed_batch_estimator_recovers_a_closed_form_noise_scale():
    """Per-example loss 1/2 |theta - x_i|^2, x_i ~ N(mu, diag(s^2)): the batch gradient
    g_B = theta - mean_i x_i ~ N(G, diag(s^2) / B) with G = theta - mu, so
    tr(Sigma) = sum s^2 and |G|^2 = sum (theta - mu)^2 exactly.

    Tolerances (5 standard deviations; Gaussian g_j): the scatter of m draws is
    (1/(m-1)) sum_k (v_k / B) chi2_{m-1}, so Var V = 2 sum_k (v_k / B)^2 / (m - 1);
    |gbar|^2 has variance sum_k [2 c_k^2 + 4 G_k^2 c_k], c_k = v_k / (B m), and V / m adds
    Var V / m^2 (independent of gbar for Gaussian samples).
    """
    rng = np.random.default_rng(3)
    d, b, m = 10, 16, 400
    mu = rng.normal(size=d)
    s = rng.uniform(0.5, 2.0, size=d)
    offset = rng.choice([-1.0, 1.0], size=d) * rng.uniform(0.5, 1.0, size=d)
    theta = jnp.asarray(mu + offset, jnp.float32)
    xs = jnp.asarray(mu + s * rng.normal(size=(m, b, d)), jnp.float32)

    grad = jax.jit(jax.grad(lambda t, x: 0.5 * jnp.mean(jnp.sum((t - x) ** 2, axis=-1))))
    est = ns.fixed_batch_noise_scale(
        lambda x: grad(theta, x), iter(xs), batch_size=b, num_batches=m
    )

    v = s**2
    v_true, g2_true = float(np.sum(v) / b), float(np.sum(offset**2))
    sd_v = math.sqrt(2 * np.sum((v / b) ** 2) / (m - 1))
    c = v / (b * m)
    sd_g2 = math.sqrt(np.sum(2 * c**2 + 4 * offset**2 * c) + sd_v**2 / m**2)
    assert abs(est.variance - v_true) <= 5 * sd_v, (est.variance, v_true, sd_v)
    assert abs(est.g2 - g2_true) <= 5 * sd_g2, (est.g2, g2_true, sd_g2)
    # The standard error from the Helmert terms is the true one (to its own ~10 % noise).
    assert 0.7 * sd_v <= est.variance_se <= 1.3 * sd_v, (est.variance_se, sd_v)
    lo = b * (v_true - 5 * sd_v) / (g2_true + 5 * sd_g2)
    hi = b * (v_true + 5 * sd_v) / (g2_true - 5 * sd_g2)
    assert lo <= est.b_simple <= hi, (est.b_simple, lo, hi, np.sum(v) / g2_true)


def test_combine_averages_numerator_and_denominator_before_dividing():
    a = ns.NoiseEstimate(16, 5, 4.0, 2.0, (1.0,) * 4)  # V = 1, |G|^2 = 1.8
    b = ns.NoiseEstimate(64, 5, 2.0, 0.2, (0.5,) * 4)  # V = 0.5, |G|^2 = 0.1
    out = ns.combine([a, b])
    assert out.count == 2
    np.testing.assert_allclose(out.trace, (16 * 1 + 64 * 0.5) / 2)
    np.testing.assert_allclose(out.g2, (1.8 + 0.1) / 2)
    np.testing.assert_allclose(out.b_simple, 24 / 0.95)
    assert not np.isclose(out.b_simple, (a.b_simple + b.b_simple) / 2)


# --------------------------------------------------------------- the per-example split

LOSSES = ("infonce", "sigmoid", "decoupled")


def _dual_encoder(loss: str):
    rngs = nnx.Rngs(0)
    model = DualEncoder(
        MLPEncoder(6, 8, 1, rngs=rngs),
        MLPEncoder(5, 8, 1, rngs=rngs),
        embed_dim=4,
        init_bias=-2.0 if loss == "sigmoid" else None,
        rngs=rngs,
    )
    return nnx.split(model)


def _pairs(b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, 6)).astype(np.float32), rng.normal(size=(b, 5)).astype(np.float32)


@functools.cache
def _reference_grad(loss: str):
    """The plain gradient of the batch ``_pairs(16)`` (one device, no cache), once per loss."""
    x, y = _pairs(16)
    graphdef, params = _dual_encoder(loss)
    cfg = TrainConfig(loss=LossConfig(loss))
    return jax.jit(
        lambda p: local_loss_and_grads(
            p, (x, y), None, graphdef=graphdef, config=cfg, axis_name=None
        )[1]
    )(params)


@pytest.mark.parametrize("chunk", [None, 8], ids=["no-cache", "cache"])
@pytest.mark.parametrize("devices", [1, 2, 8])
@pytest.mark.parametrize("loss", LOSSES)
def test_per_example_split_sums_to_the_batch_gradient(loss, devices, chunk):
    x, y = _pairs(16)
    graphdef, params = _dual_encoder(loss)
    cfg = TrainConfig(loss=LossConfig(loss), chunk_size=chunk)
    mesh = make_mesh(num_devices=devices)
    c = pe.per_example_grads(
        params, shard_batch((x, y), mesh), graphdef=graphdef, config=cfg, mesh=mesh
    )
    ref = _reference_grad(loss)
    for got, want in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(ref), strict=True):
        assert got.shape == (16, *want.shape)
        # float32 sums of 16 terms in another order than the batch gradient's
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.sum(got, axis=0), want, rtol=1e-5, atol=1e-6 * scale)
    # Not a trivial split: the examples' contributions to the tower weights differ.
    biggest = max(jax.tree_util.tree_leaves(c), key=lambda a: a[0].size)
    assert float(jnp.max(jnp.abs(biggest[0] - biggest[1]))) > 1e-3 * float(
        jnp.max(jnp.abs(biggest))
    )


def test_per_example_contribution_is_the_gradient_of_its_own_tower_copy():
    """Give every example its own copy of the tower parameters: the gradient of the batch
    loss with respect to copy i is example i's tower part of c_i (its roles as an anchor,
    a positive and a negative); what is left is the temperature's gradient over B."""
    b = 8
    x, y = _pairs(b, seed=5)
    graphdef, params = _dual_encoder("infonce")
    cfg = TrainConfig(loss=LossConfig("infonce"))
    mesh = make_mesh(num_devices=1)
    c = pe.per_example_grads(
        params, shard_batch((x, y), mesh), graphdef=graphdef, config=cfg, mesh=mesh
    )
    embed_x, embed_y = tower_fns(graphdef)
    loss_fn = make_loss_fn(graphdef, cfg.loss)

    def batch_loss(copies):
        ex = jax.vmap(lambda p, xi: embed_x(p, xi[None])[0])(copies, x)
        ey = jax.vmap(lambda p, yi: embed_y(p, yi[None])[0])(copies, y)
        return loss_fn(params, (ex, ey))[0]

    copies = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (b, *p.shape)), params)
    own = jax.jit(jax.grad(batch_loss))(copies)
    full = jax.jit(
        lambda p: local_loss_and_grads(
            p, (x, y), None, graphdef=graphdef, config=cfg, axis_name=None
        )[1]
    )(params)
    for ci, oi, gi in zip(
        jax.tree_util.tree_leaves(c),
        jax.tree_util.tree_leaves(own),
        jax.tree_util.tree_leaves(full),
        strict=True,
    ):
        rest = (gi - np.sum(oi, axis=0)) / b  # the temperature's share (zero for tower leaves)
        scale = float(jnp.max(jnp.abs(ci))) + 1e-30
        np.testing.assert_allclose(ci, oi + rest[None], rtol=1e-5, atol=1e-6 * scale)


def test_per_example_noise_scale_is_the_spread_of_the_split():
    x, y = _pairs(16, seed=7)
    graphdef, params = _dual_encoder("decoupled")
    cfg = TrainConfig(loss=LossConfig("decoupled"), chunk_size=8)
    mesh = make_mesh(num_devices=2)
    batch = shard_batch((x, y), mesh)
    est = pe.per_example_noise_scale(
        params, batch, graphdef=graphdef, config=cfg, mesh=mesh, rows_per_pass=2
    )
    c = pe.per_example_grads(params, batch, graphdef=graphdef, config=cfg, mesh=mesh)
    g = ns.make_gradient_fn(graphdef, cfg, mesh)(params, batch)
    leaves_c, leaves_g = jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(g)
    dev = sum(
        float(np.sum((16 * np.asarray(a, np.float64) - np.asarray(b_, np.float64)[None]) ** 2))
        for a, b_ in zip(leaves_c, leaves_g, strict=True)
    )
    np.testing.assert_allclose(est.sq_dev_sum, dev, rtol=1e-5)
    np.testing.assert_allclose(est.batch_sq_norm, float(ns.sq_norm(g)), rtol=1e-6)
    np.testing.assert_allclose(est.trace, dev / 15, rtol=1e-5)
    np.testing.assert_allclose(est.g2, est.batch_sq_norm - dev / 15 / 16, rtol=1e-5)


# ------------------------------------------------------- B V on a fixed checkpoint

_MIX = np.random.default_rng(123).normal(size=(6, 5)).astype(np.float32)


def _correlated_pairs(rng, b: int):
    """Pairs of a small contrastive problem: y is a noisy linear view of x."""
    x = rng.normal(size=(b, 6)).astype(np.float32)
    y = x @ _MIX  # (b, 6) · (6, 5) -> (b, 5)
    return x, (y + 0.5 * rng.normal(size=(b, 5))).astype(np.float32)


@pytest.mark.slow
def test_b_times_v_does_not_move_with_the_batch_size_on_a_fixed_checkpoint():
    """The estimator measures the data's noise, not the loss's dependence on B.

    A checkpoint of a small InfoNCE run at B = 128 (30 AdamW steps). At B/4, B and 4B the
    fixed-batch tr(Sigma) = B V of InfoNCE and of DCL (the losses whose two-size estimates
    moved 5x to 60x with B) agrees within 3 standard errors (those of the Helmert terms;
    m = 64 gives about 3.5 %, so a 15 % change would show). Not at much smaller B: B V is
    A + O(1/B) (module docstring), and at B = 8 InfoNCE's was 25 % below its value at 128.
    The sigmoid loss is left out on purpose: it sums B negatives per anchor, so its gradient
    and B V grow with B (B V / B^2 is the comparable quantity), and the balance of its
    positive and negative terms changes with B.
    """
    rngs = nnx.Rngs(0)
    model = DualEncoder(
        MLPEncoder(6, 16, 1, rngs=rngs), MLPEncoder(5, 16, 1, rngs=rngs), embed_dim=8, rngs=rngs
    )
    train_cfg = TrainConfig(
        loss=LossConfig("infonce"),
        optim=OptimConfig("adamw", learning_rate=3e-3, warmup_steps=2, total_steps=30),
    )
    mesh = make_mesh(num_devices=1)
    graphdef, state = create_train_state(model, make_optimizer(train_cfg.optim))
    state = place_state(state, mesh)
    step = make_train_step(graphdef, train_cfg, mesh)
    rng = np.random.default_rng(1)
    first = None
    for _ in range(30):
        state, metrics = step(state, shard_batch(_correlated_pairs(rng, 128), mesh), None)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 0.3  # it trained: a checkpoint, not the init
    for loss in ("infonce", "decoupled"):
        grad = ns.make_gradient_fn(graphdef, TrainConfig(loss=LossConfig(loss)), mesh)
        traces = {}
        for b in (32, 128, 512):
            draws = np.random.default_rng([2, b])
            batches = (shard_batch(_correlated_pairs(draws, b), mesh) for _ in range(64))
            est = ns.fixed_batch_noise_scale(
                lambda x, g=grad: g(state.params, x), batches, batch_size=b, num_batches=64
            )
            traces[b] = (est.trace, b * est.variance_se)
            assert traces[b][1] < 0.05 * traces[b][0], (loss, b, traces[b])
        for a, b in ((32, 128), (128, 512), (32, 512)):
            (ta, sa), (tb, sb) = traces[a], traces[b]
            assert abs(ta - tb) <= 3 * math.hypot(sa, sb), (loss, traces)


# ----------------------------------------------------------------- the training loop

FAST = [
    "--model", "mlp", "--width", "32", "--embed-dim", "16", "--head-hidden", "none",
    "--batch-size", "32", "--steps", "4", "--checkpoint-every", "2", "--log-every", "1",
    "--warmup-steps", "2", "--eval-examples", "128", "--no-progress", "--num-devices", "2",
    "--noise-scale-every", "2", "--noise-batches", "4",
]  # fmt: skip
NOISE_KEYS = ("noise_variance", "noise_variance_se", "noise_g2", "noise_trace", "noise_b_simple")


def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loop_meter_logs_the_fixed_batch_estimate_and_resumes_exactly(tmp_path):
    data_dir = tmp_path / "tfds"
    prepare_digits(data_dir)
    base = ["--data-dir", str(data_dir), *FAST]
    whole = parse_config(["--workdir", str(tmp_path / "whole"), *base])
    loop.train(whole)
    cut = ["--workdir", str(tmp_path / "cut"), *base]
    loop.train(parse_config([*cut, "--stop-after", "2"]))  # killed after step 2
    loop.train(parse_config(cut))  # resumed
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    noise_a = [r for r in a if "noise_b_simple" in r]
    assert [r["step"] for r in noise_a] == [2, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the meter leaves training alone
    for ra in noise_a:
        rb = next(r for r in b if r["step"] == ra["step"])
        assert ra["noise_batches"] == 4
        assert [ra[k] for k in NOISE_KEYS] == [rb[k] for k in NOISE_KEYS]
        assert ra["noise_variance"] > 0 and math.isfinite(ra["noise_b_simple"])
        np.testing.assert_allclose(ra["noise_trace"], 32 * ra["noise_variance"], rtol=1e-12)
        np.testing.assert_allclose(
            ra["noise_b_simple"], ra["noise_trace"] / ra["noise_g2"], rtol=1e-12
        )
    # The study's call at a checkpoint gives what the loop logged after that step.
    est = measure_checkpoint(whole, step=2, num_batches=4)
    np.testing.assert_allclose(est.variance, noise_a[0]["noise_variance"], rtol=1e-6)
    np.testing.assert_allclose(est.g2, noise_a[0]["noise_g2"], rtol=1e-6)
    # At another batch size: the same checkpoint, the run's data cut into batches of 16.
    quarter = measure_checkpoint(whole, step=2, num_batches=4, batch_size=16)
    assert quarter.batch_size == 16 and len(quarter.terms) == 3 and quarter.variance > 0
    assert quarter.trace == 16 * quarter.variance and math.isfinite(quarter.g2)
    with pytest.raises(ConfigError, match="has no checkpoint 3"):
        measure_checkpoint(whole, step=3, num_batches=4)
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        measure_checkpoint(whole.with_updates(learning_rate=0.5), step=2, num_batches=4)
    with pytest.raises(ConfigError, match="holds no checkpoint to measure"):
        measure_checkpoint(whole.with_updates(workdir=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


def test_noise_scale_flag_help_says_what_it_measures_and_costs():
    from contrastive.configs import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "fixed-batch estimator" in text and "m extra gradient computations" in text
    assert "--noise-batches" in text


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ns.fixed_batch_noise_scale(lambda b: b, iter([]), batch_size=4, num_batches=1),
            "num_batches must be an integer >= 2",
        ),
        (
            lambda: ns.fixed_batch_noise_scale(lambda b: b, iter([]), batch_size=0, num_batches=4),
            "batch_size must be a positive integer",
        ),
        (
            lambda: ns.fixed_batch_noise_scale(
                lambda b: b, iter([jnp.ones(2)] * 3), batch_size=4, num_batches=4
            ),
            "batches gave 3 batches but num_batches=4",
        ),
        (lambda: ns.combine([]), "at least one NoiseEstimate"),
        (
            lambda: pe.per_example_grads(
                _dual_encoder("infonce")[1],
                (np.zeros((8, 6), np.float32), np.zeros((16, 5), np.float32)),
                graphdef=_dual_encoder("infonce")[0],
                config=TrainConfig(),
                mesh=make_mesh(num_devices=1),
            ),
            "needs y with as many rows as x",
        ),
        (
            lambda: pe.per_example_noise_scale(
                _dual_encoder("infonce")[1],
                _pairs(8),
                graphdef=_dual_encoder("infonce")[0],
                config=TrainConfig(),
                mesh=make_mesh(num_devices=2),
                rows_per_pass=3,
            ),
            "rows_per_pass 3 must be a positive divisor of the 4 rows per device",
        ),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_docstring_examples():
    result = doctest.testmod(ns, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("flag", "more"), [("--stream", ["--chunk-size", "8"]), ("--hard-batches", [])]
)
def test_meter_refuses_inputs_without_whole_random_batches(flag, more, tmp_path):
    from contrastive.run.assemble import setup

    argv = ["--workdir", str(tmp_path / "w"), "--batch-size", "32", flag, *more]
    with pytest.raises(ConfigError, match=f"{flag} does not combine with --noise-scale-every"):
        setup(parse_config([*argv, "--noise-scale-every", "2"]))
    assert not (tmp_path / "w").exists()
