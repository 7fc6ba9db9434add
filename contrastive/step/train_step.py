"""The sharded, optionally gradient-cached train step for dual encoders.

Reads top to bottom: configs -> state -> loss -> the per-device gradient -> the step.

The whole gradient computation runs inside ``jax.shard_map`` over the ``"data"`` mesh axis.
Each device encodes only its own rows (in chunks with :mod:`contrastive.step.gradcache`, or at
once), the loss runs as a ring across the devices (``axis_name="data"``: the global loss,
exact gradients for the local embeddings), and each device pulls its embedding gradients
back through the encoder to a *partial* parameter gradient. Those partial gradients are
reduced across devices exactly once per step, after the last chunk: one all-reduce, or
one reduce-scatter when the optimiser state is sharded (``TrainConfig(shard_optimizer=
True)``; the rules are in :mod:`contrastive.mesh`). Inside, the parameters are marked as
varying over the data axis before anything is differentiated; otherwise JAX's rules for
replicated values would insert an all-reduce into the transpose of every chunk's
re-encoding pass.

Mixed precision: build the model with ``dtype=jnp.bfloat16`` (compute) and the default
``param_dtype=float32``; parameters, gradients, optimiser state, temperature, bias and the
loss accumulation stay float32. With ``param_dtype=jnp.bfloat16`` the gradients are summed
in float32 over the chunks and the devices and rounded to bfloat16 once, after the reduction.

Example::

    mesh = make_mesh()
    model = DualEncoder(MLPEncoder(64, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    cfg = TrainConfig(loss=LossConfig("infonce"), optim=OptimConfig("lamb"), chunk_size=256)
    graphdef, state = create_train_state(model, make_optimizer(cfg.optim))
    state = place_state(state, mesh, shard_optimizer=cfg.shard_optimizer)
    step = make_train_step(graphdef, cfg, mesh)
    for batch in data:  # (inputs_x, inputs_y), leaves [B, ...] as numpy
        state, metrics = step(state, shard_batch(batch, mesh), key)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from contrastive.mesh import (
    DATA_AXIS,
    batch_sharding,
    check_batch_divisible,
    optimizer_shardings,
    place,
    replicated,
)
from contrastive.step.batch_grads import (
    Batch,
    all_finite,
    as_batch,
    local_loss_and_grads,
    loss_and_grads,
    reduce_grads,
    tower_fns,
)
from contrastive.step.example_states import global_train_step
from contrastive.step.negative_queue import (
    NegativeQueue,
    queue_shardings,
)
from contrastive.step.optim import make_optimizer, make_schedule
from contrastive.step.step_loss import contrastive_loss, make_loss_fn
from contrastive.step_configs import TrainConfig, local_chunk_size

__all__ = [
    "TrainState",
    "Batch",
    "as_batch",
    "tower_fns",
    "create_train_state",
    "place_state",
    "contrastive_loss",
    "make_loss_fn",
    "loss_and_grads",
    "train_step",
    "make_train_step",
    "state_shardings",
    "reduce_grads",
    "all_finite",
    "local_loss_and_grads",
]


class TrainState(NamedTuple):
    """Everything that changes from step to step (a pytree; the graphdef is static)."""

    step: jax.Array
    params: Any  # nnx.State of the model's Params
    opt_state: Any
    queue: NegativeQueue | None = None  # past y embeddings as extra negatives, or None
    examples: Any = None  # per-example state of the global loss (contrastive.step.example_states)


def _strong(tree: Any) -> Any:
    # Scalars made from Python floats are weakly typed; the state coming out of a step is
    # not. One dtype signature avoids a second compilation, and the first step and a
    # resumed step then run the very same program (bitwise-equal losses). The copy also
    # keeps the model's own arrays alive when the step donates the state.
    return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=jnp.result_type(a)), tree)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its static graphdef and a fresh :class:`TrainState`."""
    graphdef, params = nnx.split(model)
    params = _strong(params)
    opt_state = _strong(tx.init(params))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def state_shardings(state: TrainState, mesh: Mesh, *, shard_optimizer: bool = False):
    """Shardings of a train state: replicated, except the optimiser state when sharded."""
    rep = replicated(mesh)
    opt = (
        optimizer_shardings(state.opt_state, mesh)
        if shard_optimizer
        else jax.tree_util.tree_map(lambda _: rep, state.opt_state)
    )
    queue = None if state.queue is None else queue_shardings(mesh)
    rows = jax.tree_util.tree_map(lambda _: batch_sharding(mesh), state.examples)  # data axis
    return TrainState(rep, jax.tree_util.tree_map(lambda _: rep, state.params), opt, queue, rows)


def place_state(state: TrainState, mesh: Mesh, *, shard_optimizer: bool = False) -> TrainState:
    """Put a train state on the mesh (see :func:`state_shardings`)."""
    return place(state, state_shardings(state, mesh, shard_optimizer=shard_optimizer))


# ------------------------------------------------------------- the per-device gradient


def train_step(
    state: TrainState,
    batch: tuple[Any, Any],
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a global :class:`Batch` (or ``(inputs_x, inputs_y)``).

    ``key`` drives dropout (None turns it off); it is folded with the step number so one
    key can be passed for the whole run. Returns the new state and scalar metrics: loss,
    temperature, bias (sigmoid), grad_norm (before clipping), pos_logit, neg_logit,
    learning_rate, and ``finite`` (1.0 when every parameter and optimiser-state entry of
    the new state is finite: a run must never checkpoint a state where it is 0).
    """
    if state.examples is not None:  # the global loss: per-example state
        return global_train_step(
            state, batch, key, graphdef=graphdef, config=config, tx=tx, mesh=mesh
        )
    if key is not None:
        key = jax.random.fold_in(key, state.step)
    batch = as_batch(batch)
    (loss, aux), grads, *queue = loss_and_grads(
        state.params, batch, key, graphdef=graphdef, config=config, mesh=mesh, queue=state.queue
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = all_finite(params) & all_finite(opt_state)
    metrics = {
        "loss": loss,
        **aux,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": make_schedule(config.optim)(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return TrainState(state.step + 1, params, opt_state, *queue), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    donate: bool = True,
):
    """``step(state, batch, key) -> (state, metrics)``: :func:`train_step` under ``jax.jit``.

    Args:
      graphdef: from :func:`create_train_state`.
      config: the :class:`TrainConfig`.
      mesh: from :func:`contrastive.mesh.make_mesh`; the batch is split over ``"data"``.
      tx: the optimiser used to build the state; default ``make_optimizer(config.optim)``
        (it must be the same transformation that initialised ``state.opt_state``).
      donate: donate the incoming state's buffers to the new state.

    The state must be placed with :func:`place_state` (the same ``shard_optimizer``). The
    batch must be a multiple of the device count, and with gradient caching at least
    ``chunk_size`` rows, with ``chunk_size`` a multiple of the device count; all are
    checked when the step is traced.
    """
    tx = make_optimizer(config.optim) if tx is None else tx
    local_chunk_size(config.chunk_size, mesh.shape[DATA_AXIS])
    step = functools.partial(train_step, graphdef=graphdef, config=config, tx=tx, mesh=mesh)

    def checked(state, batch, key):
        batch = as_batch(batch)
        check_batch_divisible((batch.x, batch.example_ids), mesh)
        check_batch_divisible((batch.y, batch.ids, batch.valid), mesh)
        return step(state, batch, key)

    def jitted_for(state):
        # The state's shardings follow its structure (per-leaf rules for a sharded
        # optimiser state), known only once a state (or its ShapeDtypeStructs) is seen.
        s = state_shardings(state, mesh, shard_optimizer=config.shard_optimizer)
        return jax.jit(
            checked,
            in_shardings=(s, batch_sharding(mesh), replicated(mesh)),
            out_shardings=(s, replicated(mesh)),
            donate_argnums=(0,) if donate else (),
        )

    cache: dict[Any, Any] = {}

    def step_fn(state, batch, key):
        treedef = jax.tree_util.tree_structure(state)
        if treedef not in cache:
            cache[treedef] = jitted_for(state)
        return cache[treedef](state, batch, key)

    step_fn.lower = lambda state, batch, key: jitted_for(state).lower(state, batch, key)
    return step_fn
