"""The streamed gradient cache: equal to the in-memory cached step, faults, memory, layout."""

from __future__ import annotations

import gc
import re
import threading
import weakref
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from contrastive import configs, models
from contrastive import mesh as mesh_lib
from contrastive.step import train_step as ts
from contrastive.step.optim import make_optimizer
from contrastive.step.streamed import step as ss
from contrastive.step_configs import OptimConfig
from tests.loss_cases import assert_close

D_IN = 12
RTOL = 1e-6  # the bar: float32, relative (max |a - e| <= RTOL max |e| per leaf)
# A learning rate from step 0 (no warm-up), so that the new parameters differ from the old.
OPTIM = OptimConfig("adamw", learning_rate=1e-2, total_steps=10, warmup_steps=0)


def _model(*, two_towers: bool, dropout: float, d_in: int = D_IN, seed: int = 0):
    rngs = nnx.Rngs(seed)
    tower = models.MLPEncoder(d_in, 16, 1, dropout_rate=dropout, rngs=rngs)
    other = models.MLPEncoder(d_in, 24, 1, dropout_rate=dropout, rngs=rngs) if two_towers else None
    return models.DualEncoder(
        tower, other, embed_dim=8, init_temperature=0.2, init_bias=-2.0, rngs=rngs
    )


def _batch(b: int, m: int, *, seed: int = 1, ids: bool = False, valid: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(m, D_IN)).astype(np.float32)
    x = (y[:b] + 0.3 * rng.normal(size=(b, D_IN))).astype(np.float32)
    return ts.Batch(
        x,
        y,
        rng.integers(0, max(m // 2, 1), size=m).astype(np.int32) if ids else None,
        (rng.random(m) > 0.1) if valid else None,
    )


def _setup(n, loss, *, chunk, shard=False, two_towers=False, dropout=0.3):
    mesh = mesh_lib.make_mesh(num_devices=n)
    cfg = configs.TrainConfig(loss=loss, optim=OPTIM, chunk_size=chunk, shard_optimizer=shard)
    tx = make_optimizer(cfg.optim)
    graphdef, state = ts.create_train_state(_model(two_towers=two_towers, dropout=dropout), tx)
    return mesh, cfg, tx, graphdef, ts.place_state(state, mesh, shard_optimizer=shard)


def _reference(state, batch, key, *, graphdef, cfg, tx, mesh):
    """The in-memory cached step (and its gradients) on the whole global batch, one jit."""

    @jax.jit
    def both(state, batch, key):
        folded = None if key is None else jax.random.fold_in(key, state.step)
        grads = ts.loss_and_grads(
            state.params, batch, folded, graphdef=graphdef, config=cfg, mesh=mesh
        )
        return grads, ts.train_step(
            state, batch, key, graphdef=graphdef, config=cfg, tx=tx, mesh=mesh
        )

    return both(state, mesh_lib.shard_batch(batch, mesh), key), both


class World(NamedTuple):
    mesh: Any
    cfg: configs.TrainConfig
    tx: Any
    graphdef: Any
    state: ts.TrainState
    batch: ts.Batch
    key: jax.Array
    reference: Any  # ((loss, aux), grads), (new state, metrics) of the in-memory step
    reference_fn: Any  # (state, sharded batch, key) -> the same, jitted


WORLD2 = dict(n=2, b=48, m=48, chunk=20)  # 24 rows a device in chunks of 10: 10, 10, 4


@pytest.fixture(scope="module")
def world2() -> World:
    """Two devices, SigLIP (its bias), two towers, dropout, sharded AdamW state, a ragged
    last chunk; the in-memory step's results on it. Shared: the compiled programs are
    cached per (model, config, mesh), so the tests below compile them once."""
    mesh, cfg, tx, graphdef, state = _setup(
        2, configs.LossConfig("sigmoid"), chunk=WORLD2["chunk"], shard=True, two_towers=True
    )
    batch = _batch(WORLD2["b"], WORLD2["m"])
    key = jax.random.key(3)
    ref, fn = _reference(state, batch, key, graphdef=graphdef, cfg=cfg, tx=tx, mesh=mesh)
    return World(mesh, cfg, tx, graphdef, state, batch, key, ref, fn)


def _copy(state):
    return jax.tree.map(jnp.copy, state)


class _Counted:
    """A source that counts the reads of each chunk."""

    def __init__(self, inner):
        self.inner, self.reads = inner, {}
        self.batch_sizes, self.num_chunks = inner.batch_sizes, inner.num_chunks

    def read(self, step, chunk):
        self.reads[chunk] = self.reads.get(chunk, 0) + 1
        return self.inner.read(step, chunk)


CASES = {
    # one device, SimCLR's NT-Xent (one tower on two views, intra-view negatives), 48 % 20:
    # a ragged last chunk; no key (dropout off)
    "1dev-ntxent-shared-tower-ragged-nokey": dict(
        n=1, loss=configs.LossConfig("infonce", intra_view=True), b=48, m=48, chunk=20, key=None
    ),
    # two devices, SigLIP's bias, two towers, 24 % 10 ragged, sharded AdamW state
    "2dev-sigmoid-bias-sharded-opt": "world2",
    # eight devices, DCLW, extra negatives (M = 80 > B = 48, so y has a chunk more than x),
    # duplicate ids and a padding mask, 6 % 4 ragged, sharded optimiser state
    "8dev-dclw-negatives-ids-valid-sharded-opt": dict(
        n=8,
        loss=configs.LossConfig("decoupled", sigma=0.5),
        b=48,
        m=80,
        chunk=32,
        shard=True,
        ids=True,
        valid=True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_step_equals_in_memory_step(case, request):
    """Same global batch, same key: the loss, metrics, gradients and the new state of the
    streamed step are the in-memory gradient-cached step's (dropout on where a key is given)."""
    if CASES[case] == "world2":
        w = request.getfixturevalue("world2")
        n, b, m, chunk = (WORLD2[k] for k in ("n", "b", "m", "chunk"))
        mesh, cfg, tx, graphdef, state, batch, key = w[:7]
        reference = w.reference
    else:
        c = dict(CASES[case])
        n, b, m, chunk = c.pop("n"), c.pop("b"), c.pop("m"), c.pop("chunk")
        ids, valid = c.pop("ids", False), c.pop("valid", False)
        key = c.pop("key", jax.random.key(3))
        mesh, cfg, tx, graphdef, state = _setup(n, c.pop("loss"), chunk=chunk, **c)
        batch = _batch(b, m, ids=ids, valid=valid)
        reference, _ = _reference(state, batch, key, graphdef=graphdef, cfg=cfg, tx=tx, mesh=mesh)
    ((ref_loss, ref_aux), ref_grads), (ref_state, ref_metrics) = reference

    step = ss.make_streamed_step(graphdef, cfg, mesh, tx=tx, donate=False)
    source = ss.batch_source(batch, mesh, chunk_size=chunk)
    if m > b:
        assert source.num_chunks > -(-(b // n) // (chunk // n))  # y's extra chunk: x is None
    (loss, aux), grads = step.loss_and_grads(state, source, 0, key)
    counted = _Counted(source)
    new_state, metrics = step(state, counted, 0, key)
    # Twice per chunk; thrice with a shared tower (pass 2 sweeps x, then y: the in-memory
    # order of the gradient sum, which rounds alike).
    shared = nnx.merge(graphdef, state.params).shared
    nx, ny = (-(-rows // n // (chunk // n)) for rows in (b, m))
    expected = {k: 1 + (k < nx) + (k < ny) if shared else 2 for k in range(max(nx, ny))}
    assert counted.reads == expected

    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    assert_close(aux, ref_aux, rtol=RTOL)
    assert_close(grads, ref_grads, rtol=RTOL, what="grads")
    assert set(metrics) == set(ref_metrics)
    assert_close(metrics, {k: ref_metrics[k] for k in metrics}, rtol=RTOL, what="metrics")
    assert_close(new_state, ref_state, rtol=RTOL, what="state")
    # The step did something: new parameters, a gradient for the temperature (and the bias).
    assert int(new_state.step) == 1
    old = dict(jax.tree_util.tree_leaves_with_path(state.params))
    for path, a in jax.tree_util.tree_leaves_with_path(new_state.params):
        unused = "bias" in jax.tree_util.keystr(path[:1]) and cfg.loss.name != "sigmoid"
        assert unused or float(jnp.max(jnp.abs(a - old[path]))) > 0, path
    assert float(jnp.abs(grads["log_inv_temperature"][...])) > 0
    if cfg.loss.name == "sigmoid":
        assert float(jnp.abs(grads["bias"][...])) > 0
    # Sharded optimiser state stays sharded as place_state put it.
    for a, r in zip(
        jax.tree.leaves(new_state.opt_state), jax.tree.leaves(ref_state.opt_state), strict=True
    ):
        assert a.sharding.is_equivalent_to(r.sharding, a.ndim)


def test_two_steps_fold_the_key_with_the_state_step_prefetch_or_not(world2):
    """Two steps in a row: the streamed and in-memory steps stay equal (the key is folded
    with state.step, not with the data's step index), and prefetch changes nothing."""
    w = world2
    source = ss.batch_source(w.batch, w.mesh, chunk_size=WORLD2["chunk"])
    ref_state = w.reference[1][0]
    (_, (ref_state2, ref_metrics2)) = w.reference_fn(
        ref_state, mesh_lib.shard_batch(w.batch, w.mesh), w.key
    )
    outs = {}
    for prefetch in (True, False):
        step = ss.make_streamed_step(w.graphdef, w.cfg, w.mesh, tx=w.tx, prefetch=prefetch)
        s, _ = step(_copy(w.state), source, 100, w.key)
        s, m = step(s, source, 101, w.key)
        np.testing.assert_allclose(m["loss"], ref_metrics2["loss"], rtol=RTOL)
        assert_close(s, ref_state2, rtol=RTOL)
        outs[prefetch] = s
    assert int(outs[True].step) == 2
    assert_close(outs[True], outs[False], rtol=0.0)


# ------------------------------------------------------------------------------ faults


class _Flaky:
    """A source that misbehaves on the second read of one chunk: changes one byte, or raises."""

    def __init__(self, inner, *, chunk: int, mode: str, on_read: int = 2):
        self.inner, self.chunk, self.mode, self.on_read = inner, chunk, mode, on_read
        self.batch_sizes, self.num_chunks = inner.batch_sizes, inner.num_chunks
        self.reads: dict[int, int] = {}

    def read(self, step, chunk):
        c = self.inner.read(step, chunk)
        self.reads[chunk] = self.reads.get(chunk, 0) + 1
        if chunk == self.chunk and self.reads[chunk] == self.on_read:
            if self.mode == "raise":
                raise OSError("disk went away")
            x = c.x.copy()
            x.view(np.uint8)[5] ^= 1  # one bit of one float
            return c._replace(x=x)
        return c


@pytest.mark.parametrize(
    ("mode", "on_read", "message"),
    [
        (
            "change",
            2,
            r"step 12, chunk 1: the chunk read in the second pass differs from the first "
            r"\(checksum 0x[0-9a-f]{8} != 0x[0-9a-f]{8}\): the data source is not re-readable; "
            r"no update was applied",
        ),
        (
            "raise",
            2,
            r"step 12, chunk 1: the chunk could not be read in the second pass \(OSError: disk "
            r"went away\): the data source is not re-readable; no update was applied",
        ),
        (
            "raise",
            1,
            r"step 12, chunk 1: the chunk could not be read \(OSError: disk went away\); no "
            r"update was applied",
        ),
    ],
    ids=["changed-bytes", "unreadable-pass-2", "unreadable-pass-1"],
)
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_a_bad_chunk_stops_the_step_and_applies_no_update(mode, on_read, message, prefetch, world2):
    w = world2
    good = ss.batch_source(w.batch, w.mesh, chunk_size=WORLD2["chunk"])
    state = _copy(w.state)
    before = jax.tree.map(np.array, state)
    step = ss.make_streamed_step(w.graphdef, w.cfg, w.mesh, tx=w.tx, prefetch=prefetch)
    with pytest.raises(ss.ChunkReadError) as err:  # the step donates: here it must not
        step(state, _Flaky(good, chunk=1, mode=mode, on_read=on_read), 12, w.key)
    text = str(err.value)
    assert "\n" not in text and re.fullmatch(message, text), text
    # Nothing was donated or changed: the same state still steps, to the good result.
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))
    assert_close(jax.tree.map(np.array, state), before, rtol=0.0)
    new_state, _ = step(state, good, 12, w.key)
    assert_close(new_state, w.reference[1][0], rtol=RTOL)


def test_bad_chunks_and_sources_are_one_line_value_errors(world2):
    w = world2
    mesh, graphdef = w.mesh, w.graphdef
    with pytest.raises(ValueError, match=r"needs TrainConfig\(chunk_size=\.\.\.\)"):
        ss.make_streamed_step(graphdef, configs.TrainConfig(), mesh)
    with pytest.raises(ValueError, match="does not split over the 2 devices"):
        ss.make_streamed_step(graphdef, configs.TrainConfig(chunk_size=7), mesh)
    with pytest.raises(ValueError, match="larger than the batch of 4 rows"):
        ss.batch_source(_batch(4, 4), mesh, chunk_size=8)
    with pytest.raises(ValueError, match="do not split over 2 devices"):
        ss.batch_source(_batch(5, 5), mesh, chunk_size=2)
    with pytest.raises(ValueError, match="at least as many rows as x"):
        ss.batch_source(_batch(8, 8)._replace(y=np.zeros((6, D_IN))), mesh, chunk_size=2)
    step = ss.make_streamed_step(graphdef, w.cfg, mesh, tx=w.tx)
    good = ss.batch_source(w.batch, mesh, chunk_size=WORLD2["chunk"])
    wrong = ss.batch_source(w.batch, mesh, chunk_size=10)
    state = _copy(w.state)
    with pytest.raises(ValueError, match="num_chunks=5 but .* make 3: build the source"):
        step(state, wrong, 0, w.key)

    class Short:
        batch_sizes, num_chunks = good.batch_sizes, good.num_chunks

        def read(self, step, chunk):
            c = good.read(step, chunk)
            return c._replace(y=c.y[:-1]) if chunk == 1 else c

    with pytest.raises(ValueError, match=r"^step 3, chunk 1: y has leading sizes \[19\], expe"):
        step(state, Short(), 3, w.key)
    with pytest.raises(ValueError, match="must be a ChunkSource"):
        step(state, [(1, 2)], 0, w.key)
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))


# ------------------------------------------------------------------- host-side streaming


def test_reads_each_chunk_twice_in_order_one_at_a_time_at_most_two_alive(world2):
    """Pass 1 reads chunks 0..K-1, pass 2 again; one reader thread; the host never holds
    more than two chunks of raw inputs (the current one and the prefetched one)."""
    w = world2
    inner = ss.batch_source(w.batch, w.mesh, chunk_size=WORLD2["chunk"])
    lock = threading.Lock()
    log, alive, peak, busy = [], [0], [0], [0]

    def gone():
        with lock:
            alive[0] -= 1

    class Watched:
        batch_sizes, num_chunks = inner.batch_sizes, inner.num_chunks

        def read(self, step, chunk):
            # Count the chunks the step still references: garbage that only Python's cycle
            # collector would free (its timing varies with the machine's load) is not held.
            gc.collect()
            with lock:
                busy[0] += 1
                assert busy[0] == 1, "two reads at once"
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])
                log.append(chunk)
            c = inner.read(step, chunk)
            # One owner of all the chunk's bytes: when it dies, the chunk is gone.
            owner = np.concatenate([c.x.ravel(), c.y.ravel()])
            weakref.finalize(owner, gone)
            c = ss.Chunk(owner[: c.x.size].reshape(c.x.shape), owner[c.x.size :].reshape(c.y.shape))
            with lock:
                busy[0] -= 1
            return c

    step = ss.make_streamed_step(w.graphdef, w.cfg, w.mesh, tx=w.tx, donate=False)
    step(w.state, Watched(), 0, w.key)
    k = inner.num_chunks
    assert k == 3 and log == list(range(k)) * 2
    assert peak[0] <= 2, peak[0]
    assert alive[0] == 0


@given(
    n=st.sampled_from([1, 2, 4, 8]),
    rows=st.integers(1, 7),
    extra=st.integers(0, 5),
    chunk=st.integers(1, 7),
    ids=st.booleans(),
)
def test_chunks_tile_each_devices_rows_like_the_in_memory_cache(n, rows, extra, chunk, ids):
    """Chunk k of device d is rows k c_l .. of d's shard (gradcache's contiguous chunks);
    put back in place, the chunks rebuild the global batch exactly, x, y, ids."""
    chunk = min(chunk, rows)
    mesh = mesh_lib.make_mesh(num_devices=n)
    b, m = n * rows, n * (rows + extra)
    batch = _batch(b, m, ids=ids)
    src = ss.batch_source(batch, mesh, chunk_size=chunk * n)
    assert src.num_chunks == -(-(rows + extra) // chunk)
    out = {"x": np.full_like(batch.x, np.nan), "y": np.full_like(batch.y, np.nan)}
    out_ids = np.full(m, -1)
    for k in range(src.num_chunks):
        c = src.read(0, k)
        for name, per in (("x", rows), ("y", rows + extra)):
            part = getattr(c, name)
            r = max(0, min(chunk, per - k * chunk))
            if r == 0:
                assert part is None
                continue
            assert part.shape[0] == n * r
            for d in range(n):
                out[name][d * per + k * chunk : d * per + k * chunk + r] = part[d * r : (d + 1) * r]
                if name == "y" and ids:
                    out_ids[d * per + k * chunk : d * per + k * chunk + r] = c.ids[
                        d * r : (d + 1) * r
                    ]
    np.testing.assert_array_equal(out["x"], batch.x)
    np.testing.assert_array_equal(out["y"], batch.y)
    if ids:
        np.testing.assert_array_equal(out_ids, batch.ids)


def test_rows_source_reads_a_pipelines_rows_like_the_batch_source():
    """A random-access pipeline of examples (grain) through example_rows + rows_source
    gives the chunks batch_source cuts from the assembled global batch."""
    import grain

    mesh = mesh_lib.make_mesh(num_devices=4)
    b, step_index = 24, 3
    table = np.random.default_rng(0).normal(size=(500, 2, D_IN)).astype(np.float32)
    dataset = grain.MapDataset.range(500).shuffle(seed=0).map(lambda i: table[i])

    def collate(examples):
        stacked = np.stack(examples)
        return stacked[:, 0], stacked[:, 1]

    rows = ss.example_rows(dataset, collate=collate, host_batch_size=b)
    src = ss.rows_source(rows, batch_size=b, mesh=mesh, chunk_size=8)
    whole = collate([dataset[step_index * b + i] for i in range(b)])
    ref = ss.batch_source(whole, mesh, chunk_size=8)
    assert src.num_chunks == ref.num_chunks == 3
    for k in range(src.num_chunks):
        got, want = src.read(step_index, k), ref.read(0, k)
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)


def test_checksum_sees_every_byte_shape_and_dtype():
    rng = np.random.default_rng(0)
    c = ss.Chunk(rng.normal(size=(4, 3)).astype(np.float32), {"t": np.arange(8).reshape(4, 2)})
    base = ss.chunk_checksum(c)
    assert base == ss.chunk_checksum(ss.Chunk(c.x.copy(), {"t": c.y["t"].copy()}))
    x = c.x.copy()
    x.view(np.uint8)[-1] ^= 0x80
    assert ss.chunk_checksum(c._replace(x=x)) != base
    assert ss.chunk_checksum(c._replace(x=c.x.reshape(3, 4))) != base
    assert ss.chunk_checksum(c._replace(y={"t": c.y["t"].astype(np.int32)})) != base
    assert ss.chunk_checksum(c._replace(ids=np.zeros(4, np.int32))) != base
    assert zlib.crc32(b"") == 0  # the empty seed the checksum starts from


def test_hosts_agree_on_one_process():
    mesh = mesh_lib.make_mesh(num_devices=2)
    assert ss.hosts_agree(True, mesh) is True
    assert ss.hosts_agree(False, mesh) is False


# ------------------------------------------------------------------------------ memory


def test_per_chunk_programs_do_not_grow_with_the_batch():
    """Compile only: at a fixed chunk, the pass-1 and pass-2 programs' temporaries are the
    same for B and 8 B, and their arguments grow by the [B/n, D] buffers (and a key per
    chunk), never by B x raw inputs (512 floats a row here). No reduction runs per chunk;
    the update holds the one reduction of the step."""
    n, d_in, chunk = 2, 512, 16
    mesh = mesh_lib.make_mesh(num_devices=n)
    cfg = configs.TrainConfig(optim=OPTIM, chunk_size=chunk, shard_optimizer=True)
    tx = make_optimizer(cfg.optim)
    graphdef, state = ts.create_train_state(_model(two_towers=True, dropout=0.1, d_in=d_in), tx)
    state = jax.eval_shape(lambda s: s, state)  # specs only
    x = jax.ShapeDtypeStruct((chunk, d_in), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = ss.make_streamed_step(graphdef, cfg, mesh, tx=tx)
    mem, hlo = {}, {}
    for b in (64, 512):
        lowered = step.lower(state, batch_sizes=(b, b), x=x, y=x, key=key)
        assert set(lowered) == {"keys", "embed_x", "embed_y", "loss", "pull_x", "pull_y", "update"}
        for name in ("embed_x", "embed_y", "pull_x", "pull_y") + (("update",) if b == 64 else ()):
            compiled = lowered[name].compile()
            mem[b, name] = compiled.memory_analysis()
            hlo[b, name] = compiled.as_text()
    for name in ("embed_x", "embed_y", "pull_x", "pull_y"):
        small, big = mem[64, name], mem[512, name]
        assert big.temp_size_in_bytes == small.temp_size_in_bytes, name
        rows = (512 - 64) // n
        chunks = 512 // chunk - 64 // chunk
        # one [B/n, 8] float32 buffer and one 8-byte key per chunk, per device
        grown = big.argument_size_in_bytes - small.argument_size_in_bytes
        assert grown <= rows * 8 * 4 + chunks * 8, (name, grown)
        assert not re.search(r" (all-reduce|reduce-scatter|all-gather)(-start)?\(", hlo[64, name])
    assert len(re.findall(r" reduce-scatter(-start)?\(", hlo[64, "update"])) >= 1


def test_streamed_footprint_counts_the_resident_buffers():
    f = ss.streamed_footprint(
        batch_size=1024,
        devices=4,
        embed_dim=768,
        params_bytes=1000,
        opt_state_bytes=2000,
        chunk_peak_bytes=500,
        chunk_input_bytes=300,
    )
    b, d = 256, 768
    assert f["embeddings"] == f["embedding_grads"] == 2 * b * d * 4
    assert f["ring"] == 2 * b * d * 4 + 2 * b * d * 4
    assert f["pass1"] == 3000 + 2 * b * d * 4 + 300 + 500
    assert f["loss"] == 3000 + 4 * b * d * 4 + 1000 + f["ring"]
    assert f["pass2"] == 3000 + 2 * b * d * 4 + 1000 + 300 + 500
    assert f["peak"] == max(f["pass1"], f["loss"], f["pass2"]) == f["loss"]
    # a measured loss program replaces the ring estimate; intra-view adds the x block
    assert (
        ss.streamed_footprint(
            batch_size=8,
            devices=1,
            embed_dim=4,
            params_bytes=0,
            opt_state_bytes=0,
            chunk_peak_bytes=0,
            loss_temp_bytes=7,
        )["ring"]
        == 7
    )
    g = ss.streamed_footprint(
        batch_size=1024,
        devices=4,
        embed_dim=768,
        params_bytes=1000,
        opt_state_bytes=2000,
        chunk_peak_bytes=500,
        intra_view=True,
    )
    assert g["ring"] == 2 * f["ring"]
    with pytest.raises(ValueError, match="do not split over 3 devices"):
        ss.streamed_footprint(
            batch_size=8,
            devices=3,
            embed_dim=4,
            params_bytes=0,
            opt_state_bytes=0,
            chunk_peak_bytes=0,
        )


@given(
    b=st.integers(1, 64),
    n=st.sampled_from([1, 2, 4, 8]),
    d=st.integers(1, 1024),
    extra=st.integers(0, 64),
    peak=st.integers(0, 10**9),
)
def test_streamed_footprint_is_affine_in_the_batch(b, n, d, extra, peak):
    kw = dict(
        devices=n,
        embed_dim=d,
        params_bytes=123,
        opt_state_bytes=456,
        chunk_peak_bytes=peak,
        chunk_input_bytes=789,
    )

    def f(rows):
        return ss.streamed_footprint(batch_size=rows * n, y_batch_size=(rows + extra) * n, **kw)

    one, two, three = f(b), f(b + 1), f(b + 2)
    for k in ("pass1", "loss", "pass2", "embeddings", "ring"):
        assert two[k] - one[k] == three[k] - two[k] >= 0
    assert one["peak"] == max(one["pass1"], one["loss"], one["pass2"])
