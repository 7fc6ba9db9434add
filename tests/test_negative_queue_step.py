"""The negative queue in the train step: each step's loss equals the dense oracle on the batch
plus the queued embeddings of earlier steps, and the queue holds them first in, first out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import losses
from contrastive.mesh import make_mesh, shard_batch
from contrastive.models import DualEncoder, MLPEncoder
from contrastive.step.negative_queue import init_queue
from contrastive.step.optim import make_optimizer
from contrastive.step.train_step import create_train_state, make_train_step, place_state
from contrastive.step_configs import LossConfig, OptimConfig, TrainConfig

N, B, D, K, F = 2, 8, 8, 2, 4


# Quick: each loss once, with and without the cache between them; the rest in the full run.
_QUEUED = [("infonce", 4), ("sigmoid", None), ("decoupled", 4),
           *(pytest.param(*c, marks=pytest.mark.slow)
             for c in [("infonce", None), ("sigmoid", 4), ("decoupled", None)])]  # fmt: skip


@pytest.mark.parametrize(("name", "chunk"), _QUEUED, ids=lambda v: str(v))
def test_train_step_with_queue(name, chunk):
    mesh = make_mesh(num_devices=N)
    rngs = nnx.Rngs(0)
    bias = -3.0 if name == "sigmoid" else None
    model = DualEncoder(
        MLPEncoder(F, 8, 1, rngs=rngs),
        MLPEncoder(F, 8, 1, rngs=rngs),
        embed_dim=D,
        init_bias=bias,
        rngs=rngs,
    )
    cfg = TrainConfig(
        loss=LossConfig(name),
        chunk_size=chunk,
        optim=OptimConfig("adamw", learning_rate=1e-2, total_steps=10, warmup_steps=0),
    )
    graphdef, state0 = create_train_state(model, make_optimizer(cfg.optim))
    plain = place_state(state0, mesh)
    state = place_state(state0._replace(queue=init_queue(K, B // N, D, devices=N)), mesh)
    step = make_train_step(graphdef, cfg, mesh, donate=False)
    ref = getattr(losses.reference, name)
    past = []  # (y embeddings, ids) of earlier steps
    rng = np.random.default_rng(0)
    for t in range(K + 2):
        inputs = (
            rng.normal(size=(B, F)).astype(np.float32),
            rng.normal(size=(B, F)).astype(np.float32),
        )
        ids = jnp.asarray(rng.integers(0, 5, B), jnp.int32)
        m = nnx.merge(graphdef, jax.device_get(state.params))
        x, y = m.embed_x(jnp.asarray(inputs[0])), m.embed_y(jnp.asarray(inputs[1]))
        kept = past[-K:]
        y_all = jnp.concatenate([y] + [p[0] for p in kept])
        ids_all = jnp.concatenate([ids] + [p[1] for p in kept])
        hp = {"temperature": m.temperature()}
        if bias is not None:
            hp["bias"] = m.bias_value()
        want = ref(x, y_all, ids=ids_all, **hp)
        batch = shard_batch((inputs[0], inputs[1], ids), mesh)
        if t == 0:  # empty queue: the very same step as without one
            plain_new, plain_metrics = step(plain, batch, None)
        state, metrics = step(state, batch, None)
        np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
        if t == 0:
            np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                state.params,
                plain_new.params,
            )
        past.append((y, ids))
        emb = np.asarray(state.queue.embeddings).reshape(N, K, B // N, D)
        np.testing.assert_allclose(emb[:, t % K].reshape(B, D), y, rtol=1e-5, atol=1e-6)
        assert int(state.queue.position) == (t + 1) % K
        assert int(state.step) == t + 1
