"""Checkpointer: periodic saves, keep-last-k, sharded restore, PRNG keys, atomicity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from contrastive.run.checkpoint import Checkpointer


def _state(mesh=None):
    w = jnp.arange(32.0).reshape(8, 4)
    if mesh is not None:
        w = jax.device_put(w, NamedSharding(mesh, PartitionSpec("data")))
    return {
        "params": {"w": w, "b": jnp.ones(3, jnp.bfloat16)},
        "key": jax.random.key(42),
        "step": jnp.int32(0),
    }


def test_save_every_and_keep_last(tmp_path):
    with Checkpointer(tmp_path, every=3, keep=2) as ckpt:
        saved = [s for s in range(1, 13) if ckpt.maybe_save(s, _state(), {"step": s})]
        assert saved == [3, 6, 9, 12]
        assert ckpt.all_steps() == [9, 12]
        assert ckpt.latest_step() == 12


def test_restore_latest_returns_template_when_empty(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        state = _state()
        restored, meta, step = ckpt.restore_latest(state)
        assert restored is state and meta == {}


def test_roundtrip_sharded_state_keys_and_meta(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = _state(mesh)
    state["step"] = jnp.int32(5)
    _, state["key"] = jax.random.split(state["key"])
    meta = {"step": 5, "data": {"position": 5}, "seed": 0}
    with Checkpointer(tmp_path, every=5) as ckpt:
        assert ckpt.save(5, state, meta)
    # A fresh process would build the template from scratch: different values, same layout.
    template = _state(mesh)
    with Checkpointer(tmp_path, every=5) as ckpt:
        restored, got_meta, _ = ckpt.restore_latest(template)
    assert got_meta == meta
    assert restored["params"]["w"].sharding == template["params"]["w"].sharding
    assert restored["params"]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert int(restored["step"]) == 5
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(state["key"])
    )
    # Same key, same random numbers after resume.
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"], (4,)), jax.random.normal(state["key"], (4,))
    )


def test_partial_checkpoint_is_ignored(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _state(), {"step": 1})
    # What a run killed mid-write leaves: orbax's temporary folder, never renamed.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.latest_step() == 1
        _, meta, _ = ckpt.restore_latest(_state())
        assert meta == {"step": 1}


def test_bad_options():
    with pytest.raises(ValueError, match="interval"):
        Checkpointer("/tmp/unused", every=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer("/tmp/unused", every=1, keep=0)


# --- verification, fallback, non-finite refusal ---------------------------------------------


def _big_state(mesh, scale):
    # 400 kB of float32: large enough for a data file of its own (OCDBT inlines values
    # under 1 kB into its b-tree nodes).
    w = jnp.arange(100_000.0).reshape(1000, 100) * scale
    return {
        "w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("data"))),
        "b": jnp.full(3, scale, jnp.bfloat16),
        "key": jax.random.key(scale),
    }


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _data_files(step_dir):
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


def _read_arrays(step_dir):
    """Every array of the checkpoint's ``state`` item, read straight from its OCDBT database
    with TensorStore, or None when one does not decode."""
    import tensorstore as ts

    base = {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}
    keys = [k.decode() for k in ts.KvStore.open(base).result().list().result()]
    arrays = {}
    try:
        for key in sorted(keys):
            for meta, driver in ((".zarray", "zarr"), ("zarr.json", "zarr3")):
                if key.endswith("/" + meta):
                    path = key[: -len(meta) - 1]
                    spec = {"driver": driver, "kvstore": base, "path": path}
                    arrays[path] = ts.open(spec, open=True).result().read().result()
    except ValueError:  # TensorStore's error for a chunk that does not decode
        return None
    return arrays


def _flip_middle(step_dir):
    """Flip 64 bytes near the middle of the largest data file, where the compressed chunk
    still decodes (into other values), so that only the digest can catch it.

    The file holds zstd-compressed chunks in the order they were written, which varies from
    run to run; 64 flipped bytes that hit a chunk's header make it undecodable instead (an
    error that only the processes reading that chunk see), so the first window out from the
    middle that still decodes is taken.
    """
    f = max(_data_files(step_dir), key=lambda p: p.stat().st_size)
    clean = f.read_bytes()
    before = _read_arrays(step_dir)
    mid = len(clean) // 2
    for shift in range(0, len(clean) // 2 - 64, 64):
        for start in (mid + shift, mid - shift):
            b = bytearray(clean)
            b[start : start + 64] = bytes(x ^ 0xFF for x in b[start : start + 64])
            f.write_bytes(bytes(b))
            after = _read_arrays(step_dir)
            if after is not None and any(not np.array_equal(after[k], before[k]) for k in before):
                return
    f.write_bytes(clean)
    raise AssertionError(f"no 64-byte window of {f} decodes into other values")


def _truncate_data(step_dir):
    f = max(_data_files(step_dir), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _empty_data(step_dir):
    for f in _data_files(step_dir):
        f.write_bytes(b"")


def _remove(*parts):
    def corrupt(step_dir):
        import shutil

        target = step_dir.joinpath(*parts)
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return corrupt


def _truncate_meta(step_dir):
    f = step_dir / "meta" / "metadata"
    f.write_bytes(f.read_bytes()[:5])


def _remove_manifests(step_dir):
    for f in (step_dir / "state").rglob("manifest.ocdbt"):
        f.unlink()


# Each corruption of the latest checkpoint, and what its one-line reason must say: a flip in
# compressed data still decodes, so only the digest can catch it.
CORRUPTIONS = {
    "64 bytes flipped mid data file": (_flip_middle, "digest of state['w'] differs"),
    "data file truncated": (_truncate_data, "state unreadable"),
    "data files emptied": (_empty_data, "state unreadable"),
    "meta/metadata deleted": (_remove("meta", "metadata"), "meta unreadable"),
    "meta/metadata truncated": (_truncate_meta, "meta unreadable"),
    "state/ deleted": (_remove("state"), "state unreadable"),
    "state/_METADATA deleted": (_remove("state", "_METADATA"), "state unreadable"),
    "manifests deleted": (_remove_manifests, "state unreadable"),
    "integrity record deleted": (_remove("integrity"), "meta unreadable"),
}


@pytest.mark.parametrize(("corrupt", "reason"), CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_latest_falls_back_to_older(tmp_path, corrupt, reason, caplog, capfd):
    mesh = _mesh()
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _big_state(mesh, 1), {"step": 1})
        ckpt.save(2, _big_state(mesh, 2), {"step": 2})
    corrupt(tmp_path / "checkpoints" / "2")
    with Checkpointer(tmp_path, every=1) as ckpt:
        restored, meta, step = ckpt.restore_latest(_big_state(mesh, 0))
        assert (step, meta) == (1, {"step": 1})
        np.testing.assert_array_equal(restored["w"], _big_state(mesh, 1)["w"])
        assert restored["w"].sharding == _big_state(mesh, 0)["w"].sharding
        np.testing.assert_array_equal(
            jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(1))
        )
        # Nothing deleted: the bad checkpoint is set aside, and step 2 can be saved again.
        assert (tmp_path / "checkpoints_unusable" / "2" / "meta").is_dir()
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, restored, {"step": 2}) and ckpt.all_steps() == [1, 2]
    skipped = [r.getMessage() for r in caplog.records if "unusable (" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0], skipped
    assert skipped[0].startswith(f"checkpoint 2 unusable ({reason}")
    assert skipped[0].endswith("; trying 1")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_all_corrupt_raises_one_line_and_deletes_nothing(tmp_path):
    from contrastive.run.checkpoint import NoUsableCheckpointError

    mesh = _mesh()
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _big_state(mesh, 1), {"step": 1})
        ckpt.save(2, _big_state(mesh, 2), {"step": 2})
    _flip_middle(tmp_path / "checkpoints" / "1")
    _remove("meta", "metadata")(tmp_path / "checkpoints" / "2")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path, every=1) as ckpt, pytest.raises(NoUsableCheckpointError) as info:
        ckpt.restore_latest(_big_state(mesh, 0))
    msg = str(info.value)
    assert "\n" not in msg and "none of the 2 checkpoints" in msg and "(newest, 2:" in msg
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_non_finite_state_is_refused_and_older_checkpoints_kept(tmp_path):
    from contrastive.run.checkpoint import NonFiniteStateError

    state = _state()
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, state, {"step": 2})
        for bad in [jnp.nan, jnp.inf]:
            diverged = {**state, "params": {**state["params"], "b": jnp.full(3, bad, jnp.bfloat16)}}
            with pytest.raises(NonFiniteStateError, match=r"^checkpoint 3 not written: ") as info:
                ckpt.save(3, diverged, {"step": 3}, force=True)
            assert "['params']['b']" in str(info.value) and "\n" not in str(info.value)
        assert ckpt.all_steps() == [1, 2]
        _, meta, step = ckpt.restore_latest(state)
        assert (step, meta) == (2, {"step": 2})


def test_digest_is_independent_of_sharding_and_survives_save_restore(tmp_path):
    from contrastive.run.state_digest import state_digest

    mesh = _mesh()
    state = _big_state(mesh, 3)
    on_one_device = jax.tree_util.tree_map(lambda x: jax.device_put(x, jax.devices()[0]), state)
    replicated = {**state, "w": jax.device_put(state["w"], NamedSharding(mesh, PartitionSpec()))}
    grid = jax.make_mesh((2, 4), ("r", "c"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    by_blocks = {
        **state,
        "w": jax.device_put(state["w"], NamedSharding(grid, PartitionSpec("r", "c"))),
    }
    digest = state_digest(state)
    assert state_digest(on_one_device) == digest
    assert state_digest(replicated) == digest
    assert state_digest(by_blocks) == digest
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(7, state, {"step": 7})
        restored, _ = ckpt.restore(7, _big_state(mesh, 0))
    assert state_digest(restored) == digest


def test_digest_changes_with_one_bit_or_a_swap():
    from contrastive.run.state_digest import state_digest

    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    one_bit = w.copy()
    one_bit.view(np.uint32)[3, 5] ^= 1
    swapped = w.copy()
    swapped[0, 0], swapped[7, 7] = w[7, 7], w[0, 0]
    digests = {state_digest({"w": jnp.asarray(x)})["['w']"] for x in (w, one_bit, swapped)}
    assert len(digests) == 3
    # Same bits, other shape: a different record.
    assert state_digest({"w": jnp.asarray(w.reshape(64))}) != state_digest({"w": jnp.asarray(w)})


def test_read_meta_and_check_meta(tmp_path):
    from contrastive.run.checkpoint import CheckpointCorruptError

    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _state(), {"step": 1, "config": "a"})
        ckpt.save(2, _state(), {"step": 2, "config": "a"})
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text().replace('"a"', '"b"'))  # valid JSON, altered
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.read_meta(1) == {"step": 1, "config": "a"}
        with pytest.raises(CheckpointCorruptError, match="meta differs"):
            ckpt.read_meta(2)

        def refuse(meta):
            raise ValueError(f"different run: {meta['config']}")

        with pytest.raises(ValueError, match="different run: a"):
            ckpt.restore_latest(_state(), check_meta=refuse)
        _, meta, step = ckpt.restore_latest(_state(), check_meta=lambda m: None)
        assert (step, meta["config"]) == (1, "a")


def test_bad_meta_is_refused_before_writing(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        with pytest.raises(TypeError, match="meta must be a dict"):
            ckpt.save(1, _state(), [("step", 1)])
        with pytest.raises(TypeError, match="meta must be a dict of JSON values"):
            ckpt.save(1, _state(), {"step": object()})
        assert ckpt.all_steps() == []


# --- two processes ("hosts") sharing one work dir ------------------------------------------

TWO_HOST_WORKER = """
import json, os, signal, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import json

import jax
port, pid, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
    initialization_timeout=180, heartbeat_timeout_seconds=60, shutdown_timeout_seconds=120,
)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from contrastive.run.checkpoint import Checkpointer
from contrastive.run.state_digest import state_digest
from contrastive.run.run_guard import StopSignals, WorkdirLock
from tests.test_checkpoint import _flip_middle

mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

def state(scale):
    host = np.arange(100_000.0, dtype=np.float32).reshape(1000, 100) * scale
    w = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("data")), host.__getitem__)
    key = jax.jit(lambda: jax.random.key(scale), out_shardings=NamedSharding(mesh, P()))()
    return {"w": w, "key": key}

out = {}
with WorkdirLock(workdir) as lock:  # one lock file per process index
    out["lock"] = os.path.basename(lock.path)
    out["digest"] = state_digest(state(2))
    with Checkpointer(workdir, every=1) as ckpt:
        ckpt.save(1, state(1), {"step": 1})
        ckpt.save(2, state(2), {"step": 2})
    multihost_utils.sync_global_devices("saved")
    if pid == 0:
        from pathlib import Path
        _flip_middle(Path(workdir) / "checkpoints" / "2")
    multihost_utils.sync_global_devices("corrupted")
    with Checkpointer(workdir, every=1) as ckpt:
        restored, meta, step = ckpt.restore_latest(state(0))
        out.update(step=step, meta=meta, restored=state_digest(restored))
        ckpt.save(2, restored, {"step": 2})
        out["steps"] = ckpt.all_steps()
    # Only process 1's shards unreadable: its read fails, process 0's succeeds; both must
    # still meet in the same collectives and fall back together.
    multihost_utils.sync_global_devices("saved again")
    if pid == 0:
        from pathlib import Path
        for f in (Path(workdir) / "checkpoints" / "2" / "state").glob("ocdbt.process_1/d/*"):
            f.write_bytes(b"")
    multihost_utils.sync_global_devices("emptied")
    with Checkpointer(workdir, every=1) as ckpt:
        _, _, step = ckpt.restore_latest(state(0))
        out["one_host_unreadable"] = [step, ckpt.skipped]
with StopSignals() as stop:  # a SIGTERM on one host stops both
    before = stop.agreed()
    if pid == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    out["stop"] = [before, stop.agreed(), stop.name]
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_hosts_agree_on_digests_and_fallback(tmp_path):
    import os
    import sys

    from contrastive.run.state_digest import state_digest
    from tests import processes

    env = {**os.environ, "PYTHONPATH": str(processes.REPO)}
    env.pop("XLA_FLAGS", None)
    port = processes.free_port()
    cmds = [
        [sys.executable, "-c", TWO_HOST_WORKER, str(port), str(i), str(tmp_path)] for i in range(2)
    ]
    finished = processes.finish(processes.start(cmds, env), timeout=400)
    results = []
    for i, (code, log) in enumerate(finished):
        assert code == 0, f"process {i} failed:\n{log[-3000:]}"
        line = [x for x in log.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
        assert sum("checkpoint 2 unusable (digest" in x for x in log.splitlines()) == 1
    # The digest of the global array: the same on both processes and in this 8-device process.
    mesh = _mesh()
    one_process = state_digest(_big_state(mesh, 2) | {"key": jax.random.key(2)})
    want = {k: one_process[k] for k in ("['w']", "['key']")}
    assert results[0]["digest"] == results[1]["digest"] == want
    for r in results:
        assert (r["step"], r["meta"], r["steps"]) == (1, {"step": 1}, [1, 2])
        assert r["restored"] == results[0]["restored"] != want
    assert [r["stop"] for r in results] == [[False, True, None], [False, True, "SIGTERM"]]
    # The read failed on process 1 alone: each process names its own reason, both fall back.
    (step0, skipped0), (step1, skipped1) = (r["one_host_unreadable"] for r in results)
    assert step0 == step1 == 1
    assert skipped0 == [[2, "state unreadable on another process"]]
    assert len(skipped1) == 1 and skipped1[0][1].startswith("state unreadable: ")
    assert (tmp_path / "checkpoints_unusable" / "2").is_dir()
    assert (tmp_path / "checkpoints_unusable" / "2.1").is_dir()
    assert [r["lock"] for r in results] == ["run.lock.0", "run.lock.1"]
