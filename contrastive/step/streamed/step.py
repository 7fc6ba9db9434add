"""The streamed gradient cache: a train step whose global batch is never held whole.

GradCache (Gao et al. 2021, arXiv 2101.06983) holds the activations of one chunk at a time;
:mod:`contrastive.step.train_step` still takes the whole global batch of raw inputs as one
argument. Here the raw inputs never exist whole, on the host or on a device: a re-readable
:class:`ChunkSource` hands out chunk ``k`` of this host's rows of step ``s``, twice.

With ``n`` devices, ``B`` pairs (``M >= B`` rows of ``y``), a global chunk of ``c`` rows
(``c_l = c / n`` per device) and ``K = ceil(B / n / c_l)`` chunks, one step is:

1. **Pass 1** (``K`` reads): embed chunk after chunk into device-resident buffers
   ``x`` [B/n, D] and ``y`` [M/n, D] per device (``embed_x``/``embed_y``: no activation
   outlives its chunk). Each chunk's bytes get a crc32.
2. **Loss** (one program): the ring loss over ``"data"`` on the buffers, its value and
   ``G_x = dL/dx``, ``G_y = dL/dy`` per device, and ``dL/dθ`` of the loss's own parameters
   (temperature, bias), which seeds each device's gradient accumulator ``A`` (float32 at
   least, :func:`contrastive.step.gradcache.accumulator_dtype`).
3. **Pass 2** (``K`` reads, each checked against its crc32): re-encode chunk ``k`` under
   ``jax.vjp`` with the same per-chunk key and add its pull-back to the accumulator,
   ``A += (∂e_k/∂θ)ᵀ G[k]``. No communication. When the towers share parameters (one
   tower on two views, SimCLR), pass 2 sweeps the chunks twice, all ``x`` rows then all
   ``y`` rows (``2 K`` reads): the in-memory step's order of summation, so that the sums
   round alike.
4. **Update** (one program): ``g = Σ_devices A`` (one all-reduce, or one reduce-scatter
   when the optimiser state is sharded: the rules of :mod:`contrastive.mesh`), rounded to
   the parameters' dtype, then the optax update.

Exactness: chunk ``k`` of device ``d`` holds the rows ``k c_l .. (k+1) c_l - 1`` of that
device's shard, and its key is derived exactly as the in-memory step derives it,
``chunk_keys(fold_in(fold_in(fold_in(key, state.step), d), t), rows_t, c_l)[k]`` for tower
``t``; the accumulation order is the in-memory one, so the loss, the gradients and the new
state equal those of ``make_train_step(graphdef, TrainConfig(chunk_size=c), mesh)`` on the
same global batch to float32 rounding (the same sums in the same order; the tests hold
them to 1e-6 relative).

Memory. Host: at most two chunks of raw inputs (the one being computed and, with
``prefetch=True``, the next one, read by one background thread). Device: one chunk of raw
inputs at a time (the loop waits for a chunk's program before placing the next), the
embedding buffers and their gradients ``[(B + M)/n, D]``, the accumulator (the size of the
parameters), the train state, and each program's temporaries, which for the per-chunk
programs depend on the chunk, not on ``B`` (:func:`streamed_footprint` counts it all).

Faults. A chunk that cannot be read, reads different bytes in pass 2, or has the wrong
shape stops the step with a one-line :class:`ChunkReadError` (or ``ValueError``) naming
the step and the chunk, and nothing is updated: the state passed in is never donated
before the last chunk has been read and checked, and stays valid.

Example::

    mesh = make_mesh()
    cfg = TrainConfig(chunk_size=256)
    graphdef, state = create_train_state(model, tx := make_optimizer(cfg.optim))
    state = place_state(state, mesh)
    step = make_streamed_step(graphdef, cfg, mesh, tx=tx)
    source = rows_source(my_rows, batch_size=65536, mesh=mesh, chunk_size=256)
    for s in range(steps):
        state, metrics = step(state, source, s, key)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from contrastive.mesh import DATA_AXIS, batch_sharding, replicated
from contrastive.step import gradcache
from contrastive.step.optim import make_optimizer
from contrastive.step.streamed.programs import (
    TowerInfo,
    chunk_programs,
    hosts_agree,
    place_rows,
    sharded_zeros,
    signature_of_specs,
    streamed_footprint,
    towers_share_params,
    update_programs,
)
from contrastive.step.streamed.sources import (
    Chunk,
    ChunkReadError,
    ChunkSource,
    batch_source,
    check_part,
    chunk_checksum,
    chunk_layout,
    example_rows,
    read_chunks,
    rows_source,
    tree_signature,
)
from contrastive.step.train_step import (
    TrainState,
    tower_fns,
)

# The in-memory step's own reduction rule, finiteness check and state shardings: one of each.
from contrastive.step_configs import TrainConfig, local_chunk_size

__all__ = [
    "Chunk",
    "ChunkSource",
    "ChunkReadError",
    "batch_source",
    "rows_source",
    "example_rows",
    "chunk_layout",
    "make_streamed_step",
    "streamed_footprint",
]


# ------------------------------------------------------------------------------ the step


def make_streamed_step(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: Mesh,
    *,
    tx: optax.GradientTransformation | None = None,
    prefetch: bool = True,
    donate: bool = True,
):
    """``step(state, source, step_index, key) -> (state, metrics)``: the streamed train step.

    Args:
      graphdef: from :func:`contrastive.step.train_step.create_train_state`.
      config: the :class:`TrainConfig`; ``chunk_size`` (the global chunk, a multiple of the
        device count) is required; ``loss`` and ``shard_optimizer`` as in the in-memory step.
      mesh: from :func:`contrastive.mesh.make_mesh`.
      tx: the optimiser that built ``state.opt_state``; default ``make_optimizer(config.optim)``.
      prefetch: read chunk ``k + 1`` on one background thread while chunk ``k`` computes.
      donate: donate the incoming state to the new one, in the last program only (after
        every chunk has been read and checked).

    ``step(state, source, step_index, key)``: ``state`` placed with
    :func:`contrastive.step.train_step.place_state` (same ``shard_optimizer``); ``source`` a
    :class:`ChunkSource`; ``step_index`` the step whose chunks ``source.read`` returns;
    ``key`` the run's dropout key or None (folded with ``state.step``, as in the in-memory
    step). Metrics: those of :func:`contrastive.step.train_step.train_step`. Raises
    :class:`ChunkReadError` (a chunk unreadable or changed in the second pass) or
    ``ValueError`` (a chunk of the wrong shape), the state untouched.

    Attributes of ``step``: ``loss_and_grads(state, source, step_index, key) -> ((loss,
    aux), grads)`` (the gradients the update would use; nothing updated) and
    ``lower(state, *, batch_sizes, x, y, ids=None, valid=None, key=None)`` -> dict of
    ``jax.stages.Lowered`` per program (``keys``, ``embed_x``, ``embed_y``, ``loss``,
    ``pull_x``, ``pull_y``, ``update``) for a full chunk of global input specs ``x``
    [chunk_size, ...], ``y``: compile-only memory planning.
    """
    if config.chunk_size is None:
        raise ValueError(
            "the streamed step needs TrainConfig(chunk_size=...): the global rows per chunk, "
            f"a multiple of the {mesh.shape[DATA_AXIS]} devices."
        )
    local_chunk_size(config.chunk_size, mesh.shape[DATA_AXIS])
    tx = make_optimizer(config.optim) if tx is None else tx
    prog = chunk_programs(graphdef, config, mesh)
    update_for = update_programs(graphdef, config, mesh, tx, donate)
    towers = tower_fns(graphdef)
    rows_sharding = batch_sharding(mesh)
    multi = jax.process_count() > 1
    infos: dict[Any, TowerInfo] = {}

    def tower_info(params: Any, specs: tuple[Any, Any]) -> TowerInfo:
        # Traced once per input layout, not once per step.
        sig = (jax.tree_util.tree_structure(params), tuple(map(signature_of_specs, specs)))
        if sig not in infos:
            embeddings = tuple(
                jax.eval_shape(f, params, spec, None) for f, spec in zip(towers, specs, strict=True)
            )
            infos[sig] = TowerInfo(embeddings, towers_share_params(towers, params, specs))
        return infos[sig]

    def run(state, source, step_index, key):
        """Passes 1 and 2: ``(loss, aux, acc)``; the state is only read."""
        if not isinstance(source, ChunkSource):
            raise ValueError(
                f"source must be a ChunkSource (batch_sizes, num_chunks, read), got "
                f"{type(source).__name__}"
            )
        lay = chunk_layout(tuple(source.batch_sizes), mesh, chunk_size=config.chunk_size)
        if source.num_chunks != lay.num_chunks:
            raise ValueError(
                f"source.num_chunks={source.num_chunks} but batch_sizes={source.batch_sizes} "
                f"in chunks of {config.chunk_size} make {lay.num_chunks}: build the source "
                "with the step's chunk_size."
            )
        n, n_local = lay.devices, len(lay.local_devices)
        params = state.params
        keys = (None, None) if key is None else prog.keys(key, state.step, *lay.rows)
        sums: list[int] = []
        signatures: list[Any] = [None] * 4

        def read(pass_no: int, k: int):
            where = f"step {step_index}, chunk {k}"
            try:
                chunk = source.read(step_index, k)
            except Exception as e:
                what = "could not be read" + (" in the second pass" if pass_no == 2 else "")
                hint = ": the data source is not re-readable" if pass_no == 2 else ""
                cause = " ".join(str(e).split())  # one line, whatever the source raised
                cause = cause if len(cause) <= 200 else cause[:197] + "..."
                raise ChunkReadError(
                    f"{where}: the chunk {what} ({type(e).__name__}: {cause}){hint}; no "
                    "update was applied"
                ) from e
            if not isinstance(chunk, Chunk):
                chunk = Chunk(*chunk)
            return chunk, chunk_checksum(chunk)

        def check(chunk: Chunk, k: int) -> None:
            where = f"step {step_index}, chunk {k}"
            rx, ry = lay.chunk_rows(0, k) * n_local, lay.chunk_rows(1, k) * n_local
            for i, (part, r) in enumerate(zip(chunk, (rx, ry, ry, ry), strict=True)):
                optional = i >= 2
                if optional and k > 0 and (part is None) != (signatures[i] is None):
                    raise ValueError(
                        f"{where}: {Chunk._fields[i]} is given in some chunks and not others."
                    )
                if optional and part is None:
                    continue
                check_part(part, Chunk._fields[i], r, signatures[i], where)
                if k == 0:
                    signatures[i] = tree_signature(part)

        def guarded(pass_no: int, body: Callable[[], None]) -> None:
            # With several processes a failure on one host must not leave the others
            # waiting in the next collective: everyone agrees first, then raises.
            if not multi:
                body()
                return
            try:
                body()
            except Exception:
                hosts_agree(False, mesh)
                raise
            if not hosts_agree(True, mesh):
                raise ChunkReadError(
                    f"step {step_index}: another process failed in pass {pass_no}; no update "
                    "was applied"
                )

        bufs: dict[str, Any] = {}

        def pass_one() -> None:
            token = None
            gen = read_chunks(lambda k: read(1, k), lay.num_chunks, prefetch)
            with contextlib.closing(gen):
                for k, (chunk, crc) in gen:
                    check(chunk, k)
                    sums.append(crc)
                    if k == 0:
                        _allocate(chunk)
                    for t in (0, 1):
                        r = lay.chunk_rows(t, k)
                        if r == 0:
                            continue
                        inputs = place_rows(chunk[t], mesh, r * n)
                        side = {}
                        if t == 1:
                            side = {
                                name: place_rows(v, mesh, r * n)
                                for name, v in (("ids", chunk.ids), ("valid", chunk.valid))
                                if v is not None
                            }
                        emb, side_buf, token = prog.embed[t](
                            params,
                            bufs[f"emb{t}"],
                            bufs["side"] if t == 1 else {},
                            inputs,
                            side,
                            keys[t],
                            np.int32(k),
                        )
                        bufs[f"emb{t}"] = emb
                        if t == 1:
                            bufs["side"] = side_buf
                        del inputs, side
                    del chunk
                    # One chunk on the devices at a time: wait for this chunk's programs
                    # before the next chunk is placed (async dispatch would run ahead).
                    token.block_until_ready()

        def _allocate(chunk: Chunk) -> None:
            specs = tuple(
                jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a)), part
                )
                for part in chunk[:2]
            )
            bufs["info"] = info = tower_info(params, specs)
            for t, out in enumerate(info.embeddings):
                bufs[f"emb{t}"] = sharded_zeros(
                    (lay.rows[t] * n, *out.shape[1:]), out.dtype, rows_sharding
                )
            bufs["side"] = {
                name: sharded_zeros(
                    (lay.rows[1] * n,),
                    jax.dtypes.canonicalize_dtype(np.result_type(v)),
                    rows_sharding,
                )
                for name, v in (("ids", chunk.ids), ("valid", chunk.valid))
                if v is not None
            }

        guarded(1, pass_one)
        loss, aux, acc, gx, gy = prog.loss(
            params, bufs.pop("emb0"), bufs.pop("emb1"), bufs.pop("side")
        )
        g_emb = [gx, gy]
        del gx, gy
        out = {"acc": acc}
        del acc

        # The order of the sum over chunks is the in-memory step's: chunk by chunk when the
        # towers' parameters are disjoint (each sum then sees its own chunks in order, the
        # other tower adding exact zeros); tower by tower (all x chunks, then all y chunks,
        # reading each chunk once per sweep) when they share parameters (SimCLR's one
        # tower), where interleaving would round differently.
        sweeps = ((0,), (1,)) if bufs.pop("info").shared else ((0, 1),)

        def pass_two() -> None:
            for sweep in sweeps:
                token = None
                count = max(lay.chunks[t] for t in sweep)
                gen = read_chunks(lambda k: read(2, k), count, prefetch)
                with contextlib.closing(gen):
                    for k, (chunk, crc) in gen:
                        if crc != sums[k]:
                            raise ChunkReadError(
                                f"step {step_index}, chunk {k}: the chunk read in the second "
                                f"pass differs from the first (checksum {crc:#010x} != "
                                f"{sums[k]:#010x}): the data source is not re-readable; no "
                                "update was applied"
                            )
                        for t in sweep:
                            r = lay.chunk_rows(t, k)
                            if r == 0:
                                continue
                            inputs = place_rows(chunk[t], mesh, r * n)
                            out["acc"], token = prog.pull[t](
                                params, out["acc"], g_emb[t], inputs, keys[t], np.int32(k)
                            )
                            del inputs
                            if k == lay.chunks[t] - 1:
                                g_emb[t] = None  # the tower's last chunk: free its dL/de
                        del chunk
                        token.block_until_ready()

        guarded(2, pass_two)
        return loss, aux, out["acc"]

    def step(
        state: TrainState, source: ChunkSource, step_index: int, key: jax.Array | None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, aux, acc = run(state, source, step_index, key)
        state, metrics = update_for(state)(state, acc)
        return state, {"loss": loss, **aux, **metrics}

    def loss_and_grads(
        state: TrainState, source: ChunkSource, step_index: int, key: jax.Array | None
    ) -> tuple[tuple[jax.Array, dict], Any]:
        loss, aux, acc = run(state, source, step_index, key)
        return (loss, aux), prog.grads(state.params, acc)

    def lower(
        state: TrainState,
        *,
        batch_sizes: tuple[int, int],
        x: Any,
        y: Any,
        ids: Any = None,
        valid: Any = None,
        key: Any = None,
    ) -> dict[str, jax.stages.Lowered]:
        lay = chunk_layout(tuple(batch_sizes), mesh, chunk_size=config.chunk_size)
        n = lay.devices

        def spec(shape, dtype, sharding=rows_sharding):
            return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

        params = state.params
        k = spec((), jnp.int32, replicated(mesh))
        keys = (None, None)
        if key is not None:
            keys = jax.eval_shape(lambda kk, s: prog.keys(kk, s, *lay.rows), key, state.step)
        side_chunk = {name: v for name, v in (("ids", ids), ("valid", valid)) if v is not None}
        side_buf = {name: spec((lay.rows[1] * n,), v.dtype) for name, v in side_chunk.items()}
        out: dict[str, Any] = {}
        if key is not None:
            out["keys"] = prog.keys.lower(key, state.step, *lay.rows)
        embs = []
        for t, inputs in enumerate((x, y)):
            e = jax.eval_shape(towers[t], params, inputs, None)
            buf = spec((lay.rows[t] * n, *e.shape[1:]), e.dtype)
            embs.append(buf)
            name = "xy"[t]
            out[f"embed_{name}"] = prog.embed[t].lower(
                params,
                buf,
                side_buf if t == 1 else {},
                inputs,
                side_chunk if t == 1 else {},
                keys[t],
                k,
            )
        out["loss"] = prog.loss.lower(params, embs[0], embs[1], side_buf)
        acc = jax.tree_util.tree_map(
            lambda p: spec((n, *p.shape), gradcache.accumulator_dtype(p)), params
        )
        for t, inputs in enumerate((x, y)):
            out[f"pull_{'xy'[t]}"] = prog.pull[t].lower(params, acc, embs[t], inputs, keys[t], k)
        out["update"] = update_for(state).lower(state, acc)
        return out

    step.loss_and_grads = loss_and_grads
    step.lower = lower
    return step
