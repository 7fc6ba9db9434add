"""The global contrastive loss (SogCLR, iSogCLR) in the training system (issue 34).

One train step through the real step (gather by example id, ring loss in ``shard_map``, with
and without the gradient cache, scatter back) against a step built by hand around the dense
float64 reference; the example ids the pipeline adds; a CLI run stopped and resumed against
an uninterrupted one, bit for bit, per-example state included; the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from contrastive.configs import ConfigError, LossConfig, OptimConfig, TrainConfig, parse_config
from contrastive.data import prepare_digits
from contrastive.data.pipeline import TableSource, train_examples
from contrastive.mesh import make_mesh, shard_batch
from contrastive.models import DualEncoder, MLPEncoder
from contrastive.run import loop
from contrastive.run.assemble import setup
from contrastive.run.checkpoint import Checkpointer
from contrastive.step.example_states import (
    LOG_U_EMPTY,
    ExampleOrder,
    _last_of_each,
    init_example_state,
)
from contrastive.step.train_step import Batch, create_train_state, make_train_step, place_state
from losses import reference
from tests.loss_cases import assert_close, enable_x64

B, F, D, N_EX = 16, 4, 8, 40
GAMMA, RHO, TAU_LR = 0.8, 0.1, 0.05
LR = 1000.0  # SGD: new params = params - LR * grads, so the grads are read back exactly


def _model():
    rngs = nnx.Rngs(0)
    return DualEncoder(
        MLPEncoder(F, 8, 1, rngs=rngs), MLPEncoder(F, 8, 1, rngs=rngs), embed_dim=D, rngs=rngs
    )


def _start_state(cfg: LossConfig, seed: int = 1):
    """A store part-way through a run: some examples never seen, the rest spread out."""
    rng = np.random.default_rng(seed)
    es = init_example_state(N_EX, cfg, devices=8, init_temperature=0.1)
    log_u = np.where(rng.random(N_EX) < 0.3, LOG_U_EMPTY, rng.normal(0, 2, N_EX))
    log_u = jnp.asarray(log_u, jnp.float32)
    es = es._replace(log_u_x=log_u, log_u_y=jnp.roll(log_u, 3))
    if cfg.individual_temperature:
        tau = jnp.asarray(0.1 * np.exp(rng.uniform(-0.5, 0.5, N_EX)), jnp.float32)
        es = es._replace(tau_x=tau, tau_y=jnp.roll(tau, 5))
    return es


def _hand_step(graphdef, params, inputs, es, ids, cfg: LossConfig):
    """The step built by hand: embeddings and their VJP in float32, the dense reference loss
    in float64, SGD on the parameters, the papers' rules on the store's rows."""
    xin, yin = (jnp.asarray(a) for a in inputs)

    def forward(p):
        m = nnx.merge(graphdef, p)
        return m.embed_x(xin), m.embed_y(yin), m.temperature()

    (x, y, t), vjp = jax.vjp(forward, params)
    rows = {k: np.asarray(v)[ids] for k, v in es._asdict().items() if v is not None}
    individual = cfg.individual_temperature
    with enable_x64():
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))

        def f(x, y, t, tx, ty):
            temps = {"temperature": tx, "temperature_y": ty} if individual else {"temperature": t}
            return reference.global_infonce(
                x, y, f64(rows["log_u_x"]), f64(rows["log_u_y"]), gamma=GAMMA, rho=RHO, **temps
            )

        tx, ty = (f64(rows["tau_x"]), f64(rows["tau_y"])) if individual else (None, None)
        (v, new), g = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            f64(x), f64(y), f64(t), tx, ty
        )
        v, new, g = jax.tree.map(np.asarray, (v, new, g))
    gx, gy, gt = (jnp.asarray(a, jnp.float32) for a in g[:3])
    grads = vjp((gx, gy, gt))[0]
    want = {k: np.array(a) for k, a in es._asdict().items() if a is not None}
    want["log_u_x"][ids], want["log_u_y"][ids] = new
    if individual:
        for k, gk in (("tau_x", g[3]), ("tau_y", g[4])):
            want[k][ids] = np.clip(rows[k] - TAU_LR * 2 * B * gk, 0.01, 1.0)
    return float(v), grads, want


QUICK = [(1, None, False), (8, 8, True)]  # one device and eight, cache off and on
SLOW = [(1, 8, True), (8, None, True), (8, 8, False), (1, None, True), (1, 8, False),
        (8, None, False)]  # fmt: skip


@pytest.mark.parametrize(
    "devices, chunk, individual",
    QUICK + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
)
def test_one_step_equals_the_dense_reference(devices, chunk, individual):
    mesh = make_mesh(num_devices=devices)
    loss = LossConfig(
        "global-infonce", gamma=GAMMA, rho=RHO, individual_temperature=individual,
        temperature_lr=TAU_LR,
    )  # fmt: skip
    cfg = TrainConfig(loss=loss, chunk_size=chunk, optim=OptimConfig(total_steps=2))
    tx = optax.sgd(LR)
    graphdef, state = create_train_state(_model(), tx)
    es = _start_state(loss)
    state = place_state(state._replace(examples=es), mesh)
    rng = np.random.default_rng(devices + 2 * (chunk or 0))
    inputs = [rng.normal(size=(B, F)).astype(np.float32) for _ in range(2)]
    ids = rng.choice(N_EX, B, replace=False).astype(np.int32)
    params0 = jax.device_get(state.params)
    v, grads, want = _hand_step(graphdef, params0, inputs, es, ids, loss)

    step = make_train_step(graphdef, cfg, mesh, tx=tx, donate=False)
    new, metrics = step(state, shard_batch(Batch(*inputs, example_ids=ids), mesh), None)

    assert_close(metrics["loss"], v, rtol=1e-5, what="loss")
    got = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / LR, params0, new.params)
    assert_close(got, grads, rtol=2e-4, what="grads")
    for k, w in want.items():
        a = np.asarray(getattr(new.examples, k))
        untouched = np.setdiff1d(np.arange(N_EX), ids)
        np.testing.assert_array_equal(a[untouched], w[untouched], err_msg=k)
        np.testing.assert_allclose(a[ids], w[ids], rtol=1e-5, atol=1e-5, err_msg=k)
    assert float(metrics["finite"]) == 1.0
    if individual:
        assert {"tau_min", "tau_median", "tau_max"} <= set(metrics)


def test_a_repeated_example_keeps_its_last_row():
    ids = jnp.asarray([3, 1, 3, 0, 1, 3])
    assert _last_of_each(ids, 9).tolist() == [9, 9, 9, 0, 1, 3]


def test_example_order_is_the_pipelines():
    """The ids the step is given are the rows the pipeline read (across an epoch boundary)."""
    n = 37  # not a multiple of the batch: batches straddle epochs
    src = TableSource(image=np.zeros((n, 2), np.float32), text=np.zeros((n, 3), np.int32),
                      caption_id=np.arange(n, dtype=np.int32))  # fmt: skip
    t = train_examples("shapes", global_batch_size=8, seed=3, source=src)
    order = ExampleOrder(n, 3)
    for step in (1, 4, 5, 9):
        got = t.batches()[step - 1]["caption_id"]
        np.testing.assert_array_equal(order.host_ids(step, 8), got)
    # The image pipeline shuffles the source itself: the same permutation.
    import grain

    src_order = grain.MapDataset.source(list(range(n))).shuffle(seed=3).repeat()
    assert [src_order[k] for k in range(3 * n)] == [order.order[k] for k in range(3 * n)]


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare_digits(d)
    return str(d)


TINY = [
    "--model", "mlp", "--width", "16", "--embed-dim", "8", "--head-hidden", "none",
    "--batch-size", "32", "--steps", "6", "--checkpoint-every", "2", "--log-every", "1",
    "--warmup-steps", "2", "--eval-examples", "64", "--no-progress", "--no-tensorboard",
    "--loss", "global-infonce", "--gamma", "0.7", "--individual-temperature", "--rho", "0.1",
    "--temperature-lr", "0.01", "--num-devices", "2", "--chunk-size", "16",
]  # fmt: skip


def _records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]


def _final_state(args: list[str]):
    cfg = parse_config(args)
    s = setup(cfg)
    with Checkpointer(cfg.run.workdir, every=2, keep=3) as ckpt:
        restored, _, step = ckpt.restore_latest({"train": s.state, "key": s.key})
    return step, jax.device_get(restored["train"])


@pytest.mark.slow  # three short training runs
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(data_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = lambda w: ["--workdir", str(w), "--data-dir", data_dir, *TINY]
    loop.train(parse_config(args(whole)))
    loop.train(parse_config([*args(parts), "--stop-after", "3"]))  # as if killed after 3
    assert max(r["step"] for r in _records(parts)) == 3
    loop.train(parse_config(args(parts)))  # resumes from checkpoint 2
    assert _records(parts) == _records(whole)
    (s1, a), (s2, b) = _final_state(args(whole)), _final_state(args(parts))
    assert s1 == s2 == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    es = a.examples
    assert es.tau_x is not None and es.tau_y is not None
    seen = np.asarray(es.log_u_x) > LOG_U_EMPTY
    assert 0 < seen.sum() <= 6 * 32  # the rows of the batches the run drew
    assert not np.allclose(np.asarray(es.tau_x)[seen], 0.1)  # τ_i learned


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--loss", "sigmoid", "--gamma", "0.5"], "--gamma 0.5 is an option of the global"),
        (["--individual-temperature"], "--individual-temperature is an option of the global"),
        (["--loss", "global-infonce", "--negative-queue", "2"], "--negative-queue does not"),
        (["--loss", "global-infonce", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["--loss", "global-infonce", "--chunk-size", "8", "--stream"], "--stream does not"),
        (["--loss", "global-infonce", "--dataset", "shapes", "--hard-batches"], "example id"),
        (["--loss", "global-infonce", "--dataset", "shapes", "--skip-duplicate-negatives"],
         "example id"),
        (["--loss", "global-infonce", "--individual-temperature", "--intra-view", "--rho", "1"],
         "does not combine with --intra-view"),
        (["--loss", "global-infonce"], "cannot learn its temperature at --rho 0: the loss falls"),
        (["--loss", "global-infonce", "--individual-temperature"],
         "--individual-temperature needs --rho > 0"),
    ],
)  # fmt: skip
def test_incompatible_options_are_one_line_errors(flags, words):
    with pytest.raises(ConfigError) as e:
        parse_config(["--workdir", "x", *flags])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_noise_scale_with_the_global_loss_is_refused(data_dir, tmp_path):
    args = ["--workdir", str(tmp_path / "w"), "--data-dir", data_dir, *TINY]
    with pytest.raises(ConfigError, match="--noise-scale-every"):
        setup(parse_config([*args, "--noise-scale-every", "2"]))


def test_a_batch_without_example_ids_is_refused():
    mesh = make_mesh(num_devices=1)
    loss = LossConfig("global-infonce")
    cfg = TrainConfig(loss=loss, optim=OptimConfig(total_steps=2))
    graphdef, state = create_train_state(_model(), optax.sgd(1.0))
    state = place_state(state._replace(examples=init_example_state(N_EX, loss)), mesh)
    step = make_train_step(graphdef, cfg, mesh, tx=optax.sgd(1.0))
    x = np.zeros((B, F), np.float32)
    with pytest.raises(ValueError, match="needs each row's example id"):
        step(state, shard_batch(Batch(x, x), mesh), None)


@pytest.mark.parametrize("individual", [False, True])
def test_a_run_on_one_device_trains(data_dir, tmp_path, individual):
    # On one device placing the state keeps its buffers as they are: two fields that shared
    # one (both directions' u, or τ) were donated twice and the first step failed.
    flags = [f for f in TINY if f not in ("--individual-temperature",)]
    flags = flags[: flags.index("--num-devices")]
    args = ["--workdir", str(tmp_path / "w"), "--data-dir", data_dir, *flags,
            "--num-devices", "1", "--steps", "2", "--checkpoint-every", "2"]  # fmt: skip
    if individual:
        args.append("--individual-temperature")
    else:  # SogCLR: a fixed temperature
        args = [a for a in args if a not in ("--rho", "0.1", "--temperature-lr", "0.01")]
        args.append("--no-learn-temperature")
    records = loop.train(parse_config(args))
    assert [r["step"] for r in records if "loss" in r][-1] == 2
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
