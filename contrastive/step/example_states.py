"""Per-example state of the global contrastive loss (SogCLR, iSogCLR) in the train step.

``--loss global-infonce`` trains with :func:`losses.global_infonce`: SogCLR (Yuan et al.,
ICML 2022, arXiv 2202.12387) keeps for every training example ``i`` and direction a moving
average ``u_i`` of its negatives' mean ``ĝ_i = (1/N_i) Σ_j exp((h_ij − h_ii)/τ_i)``, which
stands in for the sum over the whole data set; iSogCLR (Qiu et al., ICML 2023, arXiv
2305.11965; ``--individual-temperature``) also learns a temperature ``τ_i`` per example.

Update rules, one step on a batch of ids ``I`` (only the rows of ``I`` change):

* ``u_i ← (1 − γ) u_i + γ ĝ_i`` (``--gamma``), kept as ``log u`` and computed by the loss,
  which returns the new rows. The papers start from ``u = 0``; the store holds it as
  ``log u = LOG_U_EMPTY = −1e30`` (``exp`` of it is exactly 0 in float32, so every update
  is the ``−inf`` one), since a checkpoint refuses non-finite values;
* ``τ_i ← clip(τ_i − η_τ G_i, τ_min, τ_max)`` (``--temperature-lr``, ``--min-temperature``,
  ``--max-temperature``): projected SGD, the papers' rule, on the per-example gradient
  ``G_i = log(ε + u_i) + ρ + τ_i/(ε + u_i) ∂ĝ_i/∂τ_i`` (with the *new* ``u_i``). The loss is
  ``(1/B) Σ_i`` (and ``½`` over the two directions) of per-example terms, so ``G_i`` is ``B``
  (``2B`` when symmetric) times the gradient of the loss by ``τ_i``. ``τ`` starts at the
  run's initial temperature (``--temperature`` or the loss's 0.1); the model's own
  temperature is then unused (and logged unchanged).

Storage and sharding. One float32 per example and direction for ``log u`` (``x → y`` and,
when symmetric, ``y → x``), plus one per example and direction for ``τ_i``: an
:class:`ExampleState` of data-set-sized vectors, rows padded to a multiple of the device
count and split over the mesh's ``"data"`` axis, as the negative queue's buffers are
(:mod:`contrastive.step.negative_queue`). It is a field of the train state
(``TrainState.examples``), so the checkpoint (orbax, atomic) holds it with the parameters,
and a resumed run continues it exactly.

Example ids. The loss needs each row's example id (its index in the training set): the
batch carries them as ``Batch.example_ids`` (int32 ``[B]``, sharded like the rows), which
:func:`with_example_ids` adds to the data pipeline's batches from the run's shuffled order
(:class:`ExampleOrder`). The step gathers ``store[ids]`` (global arrays under ``jit``: XLA
moves what it needs between the shards), runs the loss inside ``shard_map`` on the local
rows (the ring, with or without the gradient cache), and scatters the new rows back; when a
batch holds an example twice (a batch across an epoch boundary), its last row wins.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec

import losses
from contrastive.mesh import DATA_AXIS, batch_sharding, mark_varying, scatter_axes
from contrastive.step.batch_grads import (
    all_finite,
    as_batch,
    local_loss_and_grads,
    reduce_grads,
    tower_fns,
)
from contrastive.step.optim import make_schedule
from contrastive.step.step_loss import logit_stats
from contrastive.step_configs import DEFAULT_GAMMA, LossConfig, TrainConfig
from losses._common import global_sum

__all__ = [
    "ExampleState",
    "init_example_state",
    "example_shardings",
    "ExampleOrder",
    "with_example_ids",
    "global_loss_fn",
    "global_train_step",
    "temperature_metrics",
]

# log u of an example never seen: u = exp(-1e30) = 0, finite (checkpoints refuse -inf).
LOG_U_EMPTY = -1e30

# The aux entry in which the loss hands out the new ``log u`` rows (local, per device).
NEW_ROWS = "global_rows"


class ExampleState(NamedTuple):
    """Data-set-sized per-example state (a pytree): ``[N']`` float32 vectors, ``N'`` the
    number of training examples rounded up to the device count (the padding is never read).
    Fields of a run without them are None."""

    log_u_x: jax.Array  # log u of the x anchors (x -> y direction)
    log_u_y: jax.Array | None  # log u of the y anchors (y -> x); None unless symmetric
    tau_x: jax.Array | None  # τ_i of the x anchors; None without individual temperatures
    tau_y: jax.Array | None  # τ_i of the y anchors; None unless symmetric and individual


def init_example_state(
    num_examples: int,
    cfg: LossConfig,
    *,
    devices: int = 1,
    init_temperature: float = 0.1,
) -> ExampleState:
    """The state before any step: ``log u = LOG_U_EMPTY`` (``u = 0``), ``τ_i`` the initial
    temperature (clipped to the bounds)."""
    rows = -(-num_examples // devices) * devices
    t0 = min(max(init_temperature, cfg.min_temperature), cfg.max_temperature)

    # One buffer per field: the step donates the state, and a buffer two fields shared
    # (placing it on one device keeps it shared) would be donated twice.
    def log_u() -> jax.Array:
        return jnp.full((rows,), LOG_U_EMPTY, jnp.float32)

    def tau() -> jax.Array | None:
        return jnp.full((rows,), t0, jnp.float32) if cfg.individual_temperature else None

    both = cfg.symmetric
    return ExampleState(log_u(), log_u() if both else None, tau(), tau() if both else None)


def example_shardings(state: ExampleState, mesh: Mesh) -> ExampleState:
    """Rows split over the data axis (as the negative queue's); None fields stay None."""
    return jax.tree_util.tree_map(lambda _: batch_sharding(mesh), state)


# ----------------------------------------------------------------------- example ids


class ExampleOrder:
    """The example ids of the training batches: global example ``k`` of the run (see
    :class:`contrastive.data.pipeline.TrainExamples`) is training example ``order[k]``, the
    same shuffle (``seed``) of ``range(num_examples)`` every epoch as the pipeline's."""

    def __init__(self, num_examples: int, seed: int, order: Any = None):
        self.num_examples = num_examples
        if order is None:
            order = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
        self.order = order

    def host_ids(self, step: int, global_batch: int) -> np.ndarray:
        """int32 ``[B / P]``: this host's rows' ids of step ``step`` (``1, 2, ...``)."""
        pc, pi = jax.process_count(), jax.process_index()
        b = global_batch // pc
        first = ((step - 1) * pc + pi) * b
        return np.asarray([self.order[first + j] for j in range(b)], np.int32)


def with_example_ids(make_batch: Any, order: ExampleOrder, global_batch: int):
    """``make_batch(host, step)`` whose batches also carry ``example_ids``."""

    def build(host: dict, step: int):
        return make_batch(host, step)._replace(example_ids=order.host_ids(step, global_batch))

    return build


# ------------------------------------------------------------------------------ the loss


def global_loss_fn(
    graphdef: nnx.GraphDef,
    cfg: LossConfig,
    axis_name: str | None,
    log_u: tuple[jax.Array, jax.Array | None],
    valid: jax.Array | None = None,
):
    """``loss_fn((params, taus), (x, y)) -> (loss, aux)``: :func:`losses.global_infonce` with
    this batch's rows of the state. ``taus``: None (the model's temperature, differentiable
    through ``params``) or ``(τ_x, τ_y)`` rows (``τ_y`` None unless symmetric).
    ``aux[NEW_ROWS]`` holds the new ``(log u_x, log u_y)`` rows (per device)."""

    def loss_fn(p, embeddings):
        params, taus = p
        model = nnx.merge(graphdef, params)
        x, y = embeddings
        t = model.temperature()
        if taus is None:
            temps = {"temperature": t}
            shown = t
        else:
            temps = {"temperature": taus[0]}
            if taus[1] is not None:
                temps["temperature_y"] = taus[1]
            n = x.shape[0] * (1 if axis_name is None else lax.psum(1, axis_name))
            shown = global_sum(jnp.sum(lax.stop_gradient(taus[0])), axis_name) / n
        kw = {} if cfg.block_size is None else {"block_size": cfg.block_size}
        loss, new = losses.global_infonce(
            x,
            y,
            log_u[0],
            log_u[1],
            gamma=DEFAULT_GAMMA if cfg.gamma is None else cfg.gamma,
            rho=cfg.rho,
            symmetric=cfg.symmetric,
            intra_view=cfg.intra_view,
            valid=valid,
            axis_name=axis_name,
            **temps,
            **kw,
        )
        aux = {"temperature": t, **logit_stats(x, y[: x.shape[0]], shown, None, axis_name)}
        return loss, {**aux, NEW_ROWS: new}

    return loss_fn


def _local_step(params, batch, key, rows, *, graphdef, config, scatter):
    """Inside ``shard_map``: ``((loss, aux), grads reduced, new log u rows, dL/dτ rows)``."""

    params = mark_varying(params)
    if key is not None:
        key = jax.random.fold_in(key, lax.axis_index(DATA_AXIS))
    log_u, taus = (rows.log_u_x, rows.log_u_y), None
    if rows.tau_x is not None:
        taus = (rows.tau_x, rows.tau_y)
    loss_fn = global_loss_fn(graphdef, config.loss, DATA_AXIS, log_u, batch.valid)
    ex, ey = tower_fns(graphdef)
    towers = (lambda p, a, k: ex(p[0], a, k), lambda p, a, k: ey(p[0], a, k))
    (loss, aux), (grads, g_tau) = local_loss_and_grads(
        (params, taus),
        batch,
        key,
        graphdef=graphdef,
        config=config,
        axis_name=DATA_AXIS,
        keep_accumulator_dtype=True,
        loss_fn=loss_fn,
        towers=towers,
    )
    aux = dict(aux)
    new = aux.pop(NEW_ROWS)
    aux = jax.tree_util.tree_map(lambda a: lax.pmax(a, DATA_AXIS), aux)
    grads = reduce_grads(grads, DATA_AXIS, scatter)
    grads = jax.tree_util.tree_map(lambda p, g: g.astype(p.dtype), params, grads)
    # dL/dτ rows are this device's own (the loss's ring gives each its full gradient).
    return (loss, aux), grads, new, g_tau


def _last_of_each(ids: jax.Array, rows: int) -> jax.Array:
    """``ids`` with every earlier copy of a repeated id replaced by ``rows`` (out of range,
    dropped by the scatter): the last row of an example wins, deterministically."""
    order = jnp.argsort(ids, stable=True)
    s = ids[order]
    last = jnp.append(s[1:] != s[:-1], True)
    keep = jnp.zeros_like(last).at[order].set(last)
    return jnp.where(keep, ids, rows)


def temperature_metrics(t: jax.Array) -> dict[str, jax.Array]:
    """``tau_min``, ``tau_median``, ``tau_max`` of the learned ``τ_i`` (the metric writers have
    no histogram; these three scalars go to metrics.jsonl and TensorBoard)."""
    return {"tau_min": jnp.min(t), "tau_median": jnp.median(t), "tau_max": jnp.max(t)}


def global_train_step(
    state: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
):
    """:func:`contrastive.step.train_step.train_step` for a state with ``examples``: the rows of
    the batch's ids are gathered, the loss's new ``log u`` (and the updated ``τ_i``) are
    scattered back. Metrics as there, plus ``tau_min/median/max`` with individual
    temperatures."""

    if key is not None:
        key = jax.random.fold_in(key, state.step)
    batch = as_batch(batch)
    ids = batch.example_ids
    if ids is None:
        raise ValueError(
            "the global-infonce loss needs each row's example id: pass Batch(..., example_ids=)"
        )
    ids = ids.astype(jnp.int32)
    es = state.examples
    size = es.log_u_x.shape[0]
    rows = jax.tree_util.tree_map(lambda a: a[ids], es)
    cfg = config.loss
    scatter = (
        scatter_axes(state.params, mesh.shape[DATA_AXIS])
        if config.shard_optimizer
        else jax.tree_util.tree_map(lambda _: None, state.params)
    )
    grad_specs = jax.tree_util.tree_map(
        lambda a: PartitionSpec() if a is None else PartitionSpec(*([None] * a), DATA_AXIS),
        scatter,
        is_leaf=lambda a: a is None,
    )
    r = PartitionSpec(DATA_AXIS)
    row_specs = jax.tree_util.tree_map(lambda _: r, rows)
    new_specs = (r, r if cfg.symmetric else None)
    tau_specs = None if rows.tau_x is None else (r, r if cfg.symmetric else None)

    def local(params, batch, key, rows):
        return _local_step(
            params, batch, key, rows, graphdef=graphdef, config=config, scatter=scatter
        )

    (loss, aux), grads, new, g_tau = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), r, PartitionSpec(), row_specs),
        out_specs=((PartitionSpec(), PartitionSpec()), grad_specs, new_specs, tau_specs),
    )(state.params, batch, key, rows)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    target = _last_of_each(ids, size)
    put = lambda store, v: None if store is None else store.at[target].set(v, mode="drop")
    log_u_x, log_u_y = put(es.log_u_x, new[0]), put(es.log_u_y, new[1])
    tau_x, tau_y, extra = es.tau_x, es.tau_y, {}
    if g_tau is not None:
        # G_i: the per-example gradient (the loss averages over B anchors and 2 directions).
        scale = ids.shape[0] * (2.0 if cfg.symmetric else 1.0)

        def step_tau(t, g):
            return jnp.clip(t - cfg.temperature_lr * scale * g, cfg.min_temperature,
                            cfg.max_temperature)  # fmt: skip

        tau_x = put(es.tau_x, step_tau(rows.tau_x, g_tau[0]))
        if es.tau_y is not None:
            tau_y = put(es.tau_y, step_tau(rows.tau_y, g_tau[1]))
        # Over the whole store (its padding, under one row per device, keeps the initial τ).
        extra = temperature_metrics(tau_x if tau_y is None else jnp.concatenate([tau_x, tau_y]))
    examples = es._replace(log_u_x=log_u_x, log_u_y=log_u_y, tau_x=tau_x, tau_y=tau_y)
    finite = all_finite(params) & all_finite(opt_state) & all_finite(examples)
    metrics = {
        "loss": loss,
        **aux,
        **extra,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": make_schedule(config.optim)(state.step),
        "finite": finite.astype(jnp.float32),
    }
    new_state = state._replace(
        step=state.step + 1, params=params, opt_state=opt_state, examples=examples
    )
    return new_state, metrics
