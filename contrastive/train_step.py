"""The sharded, optionally gradient-cached train step for dual encoders.

``train_step`` is a pure module-level function of ``(state, batch, key)``; ``make_train_step``
jits it with explicit shardings (batch split over the ``"data"`` mesh axis, state
replicated) and donates the state. With ``TrainConfig.chunk_size`` set, gradients come from
:func:`contrastive.gradcache.value_and_grad`: the encoder activations held at once are those
of one chunk, while the loss is the full-batch one.

The loss sees the global ``[B, D]`` embeddings. By default it runs under plain ``jit``
(GSPMD partitions it); :func:`global_loss` is the hook that switches to the ring losses
(``LossConfig(ring=True)``: the loss runs inside ``jax.shard_map`` over ``"data"`` with
``axis_name="data"``, each device holding its rows only).

Mixed precision: build the model with ``dtype=jnp.bfloat16`` (compute) and the default
``param_dtype=float32``; parameters, gradients, optimiser state, temperature, bias and the
loss accumulation stay float32.

Example::

    mesh = make_mesh()
    model = DualEncoder(MLPEncoder(64, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    cfg = TrainConfig(loss=LossConfig("infonce"), optim=OptimConfig("lamb"), chunk_size=256)
    graphdef, state = create_train_state(model, make_optimizer(cfg.optim))
    state = place_params(state, mesh)
    step = make_train_step(graphdef, cfg, mesh)
    for batch in data:  # (inputs_x, inputs_y), leaves [B, ...] as numpy
        state, metrics = step(state, shard_batch(batch, mesh), key)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import losses
from contrastive import gradcache
from contrastive.mesh import DATA_AXIS, batch_sharding, check_batch_divisible, replicated
from contrastive.models import encode_fn
from contrastive.optim import OptimConfig, make_optimizer, make_schedule

__all__ = [
    "LossConfig",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "contrastive_loss",
    "global_loss",
    "make_loss_fn",
    "loss_and_grads",
    "train_step",
    "make_train_step",
]

LOSSES = ("infonce", "sigmoid", "decoupled")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss and its options (see ``losses``).

    Attributes:
      name: "infonce" (CLIP; NT-Xent with ``intra_view``), "sigmoid" (SigLIP; the model
        needs a bias: ``DualEncoder(init_bias=-10.0)``) or "decoupled" (DCL/DCLW).
      symmetric, intra_view: softmax losses only.
      sigma: DCLW weighting for "decoupled"; None is plain DCL.
      block_size: similarity tile edge of the tiled losses; None lets the loss choose.
      ring: run the loss inside ``shard_map`` with ``axis_name="data"`` (ring losses; the
        default). False calls it on the global arrays and leaves the partitioning to GSPMD.
    """

    name: str = "infonce"
    symmetric: bool = True
    intra_view: bool = False
    sigma: float | None = None
    block_size: int | None = None
    ring: bool = True

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {LOSSES}.")
        if self.sigma is not None and self.name != "decoupled":
            raise ValueError(f"sigma is an option of the 'decoupled' loss, not {self.name!r}.")
        if self.intra_view and self.name == "sigmoid":
            raise ValueError("intra_view is an option of the softmax losses, not 'sigmoid'.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train step settings: loss, optimiser, and the gradient-cache chunk size.

    ``chunk_size=None`` runs the encoder on the whole batch (plain step); an int runs it in
    chunks of that many rows (gradient caching). On a mesh of n devices, a chunk size that
    is a multiple of n keeps every chunk spread over all devices.
    """

    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    chunk_size: int | None = None


class TrainState(NamedTuple):
    """Everything that changes from step to step (a pytree; the graphdef is static)."""

    step: jax.Array
    params: Any  # nnx.State of the model's Params
    opt_state: Any


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its static graphdef and a fresh :class:`TrainState`.

    The parameters are copied: the jitted step donates the state, and the model's own
    arrays must survive that.
    """
    graphdef, params = nnx.split(model)
    params = jax.tree_util.tree_map(jnp.copy, params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def contrastive_loss(
    x: jax.Array,
    y: jax.Array,
    temperature: jax.Array,
    bias: jax.Array | None,
    cfg: LossConfig,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """Call the configured loss on embeddings x, y [B, D] (local shards with axis_name)."""
    kw: dict[str, Any] = {"temperature": temperature}
    # Passed only when set, so this works with the dense losses that lack these arguments.
    if cfg.block_size is not None:
        kw["block_size"] = cfg.block_size
    if axis_name is not None:
        kw["axis_name"] = axis_name
    if cfg.name == "sigmoid":
        if bias is None:
            raise ValueError(
                "the sigmoid loss needs a learnable bias: build the model with "
                "DualEncoder(..., init_bias=-10.0)."
            )
        return losses.sigmoid(x, y, bias=bias, **kw)
    if cfg.name == "infonce":
        return losses.infonce(x, y, symmetric=cfg.symmetric, intra_view=cfg.intra_view, **kw)
    return losses.decoupled(
        x, y, sigma=cfg.sigma, symmetric=cfg.symmetric, intra_view=cfg.intra_view, **kw
    )


def global_loss(
    x: jax.Array,
    y: jax.Array,
    temperature: jax.Array,
    bias: jax.Array | None,
    cfg: LossConfig,
    mesh: Mesh | None = None,
) -> jax.Array:
    """The full-batch loss of global embeddings x, y [B, D] sharded over ``"data"``.

    This is the hook for the ring losses: with ``cfg.ring`` and a mesh, the loss runs
    inside ``jax.shard_map`` on each device's rows with ``axis_name="data"`` (global value
    on every device, exact gradients w.r.t. the local rows); otherwise it is called on the
    global arrays and GSPMD partitions it.
    """
    if not cfg.ring or mesh is None:
        return contrastive_loss(x, y, temperature, bias, cfg)
    b = jnp.zeros((), jnp.float32) if bias is None else bias
    rows, scalar = PartitionSpec(DATA_AXIS), PartitionSpec()

    def local(x, y, t, b):
        return contrastive_loss(x, y, t, None if bias is None else b, cfg, axis_name=DATA_AXIS)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, scalar, scalar), out_specs=scalar)(
        x, y, temperature, b
    )


def _logit_stats(x: jax.Array, y: jax.Array, temperature, bias) -> dict[str, jax.Array]:
    """Mean positive and negative logits without forming the B x B matrix (O(B D))."""
    x, y = jax.lax.stop_gradient(x).astype(jnp.float32), jax.lax.stop_gradient(y)
    y = y.astype(jnp.float32)
    n = x.shape[0]
    pos = jnp.sum(x * y)  # sum_i x_i . y_i
    total = jnp.dot(jnp.sum(x, axis=0), jnp.sum(y, axis=0))  # (D,) . (D,) -> sum_ij x_i . y_j
    t = jax.lax.stop_gradient(temperature)
    b = 0.0 if bias is None else jax.lax.stop_gradient(bias)
    return {
        "pos_logit": pos / float(n) / t + b,
        "neg_logit": (total - pos) / float(max(n * (n - 1), 1)) / t + b,
    }


def make_loss_fn(graphdef: nnx.GraphDef, cfg: LossConfig, mesh: Mesh | None = None):
    """``loss_fn(params, (x, y)) -> (loss, aux)`` with the model's temperature and bias."""

    def loss_fn(params, embeddings):
        model = nnx.merge(graphdef, params)
        x, y = embeddings
        t = model.temperature()
        b = model.bias_value() if cfg.name == "sigmoid" else None
        loss = global_loss(x, y, t, b, cfg, mesh)
        aux = {"temperature": t, **_logit_stats(x, y, t, b)}
        if b is not None:
            aux["bias"] = b
        return loss, aux

    return loss_fn


def loss_and_grads(
    params: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh | None = None,
) -> tuple[tuple[jax.Array, dict], Any]:
    """``((loss, aux), grads)`` of the full-batch loss, gradient-cached or plain."""
    encode = encode_fn(graphdef)
    loss_fn = make_loss_fn(graphdef, config.loss, mesh)
    if config.chunk_size is None:
        return jax.value_and_grad(lambda p: loss_fn(p, encode(p, batch, key)), has_aux=True)(params)
    f = gradcache.value_and_grad(encode, loss_fn, chunk_size=config.chunk_size, has_aux=True)
    return f(params, batch, key)


def train_step(
    state: TrainState,
    batch: tuple[Any, Any],
    key: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a global batch ``(inputs_x, inputs_y)``, leaves [B, ...].

    ``key`` drives dropout (None turns it off); it is folded with the step number so one
    key can be passed for the whole run. Returns the new state and scalar metrics: loss,
    temperature, bias (sigmoid), grad_norm (before clipping), pos_logit, neg_logit,
    learning_rate.
    """
    if key is not None:
        key = jax.random.fold_in(key, state.step)
    (loss, aux), grads = loss_and_grads(
        state.params, batch, key, graphdef=graphdef, config=config, mesh=mesh
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        **aux,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": make_schedule(config.optim)(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    state_sharding: Any = None,
    donate: bool = True,
):
    """``step(state, batch, key) -> (state, metrics)``: :func:`train_step` under ``jax.jit``.

    Args:
      graphdef: from :func:`create_train_state`.
      config: the :class:`TrainConfig`.
      mesh: from :func:`contrastive.mesh.make_mesh`; the batch is split over ``"data"``.
      tx: the optimiser used to build the state; default ``make_optimizer(config.optim)``
        (it must be the same transformation that initialised ``state.opt_state``).
      state_sharding: sharding (or pytree of shardings) of the state; default replicated.
      donate: donate the incoming state's buffers to the new state.

    The batch must be a multiple of the device count, and with gradient caching at least
    ``chunk_size`` rows; both are checked when the step is traced.
    """
    tx = make_optimizer(config.optim) if tx is None else tx
    state_sharding = replicated(mesh) if state_sharding is None else state_sharding
    step = functools.partial(train_step, graphdef=graphdef, config=config, tx=tx, mesh=mesh)

    def checked(state, batch, key):
        check_batch_divisible(batch, mesh)
        return step(state, batch, key)

    return jax.jit(
        checked,
        in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
