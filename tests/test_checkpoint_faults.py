"""Disk faults while a checkpoint is written, and the files no checkpoint references.

A full disk is simulated where orbax's write path is Python: the array writes
(``serialization.async_serialize_from_host``, which hands each array to TensorStore), the OCDBT
merge in orbax's finalize, and the metadata and commit-marker files orbax writes through
``async_path.write_text``. Each is looked up as a module attribute at call time, so a
monkeypatch there fails the write at that stage, after the files of the earlier stages are on
disk. ``test_real_full_disk`` fills a real (1 MiB tmpfs) file system instead, where Linux lets
an unprivileged user mount one (``unshare -rm``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.path import async_path
from orbax.checkpoint._src.serialization import ocdbt_utils, serialization

from contrastive.run.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointWriteError,
    unreferenced_files,
)
from contrastive.run.state_digest import state_digest
from tests.test_checkpoint import _big_state, _mesh

REPO = Path(__file__).resolve().parents[1]
TMP = ".orbax-checkpoint-tmp"


def _enospc(path: object = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _assert_identical(got, want) -> None:
    """Bit for bit: same structure, dtypes, shapes and bytes (PRNG keys by their data)."""

    def raw(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.asarray(x)
        return a.dtype, a.shape, a.tobytes()

    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert raw(g) == raw(w)
    assert state_digest(got) == state_digest(want)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- injections: each fails the write of checkpoint `step` at one stage ---------------------


def _array_write(error):
    """``error()`` (a new exception each time) raised after an array of the write is on disk."""

    def inject(m, step):
        real = serialization.async_serialize_from_host

        async def failing(*args, **kwargs):
            await real(*args, **kwargs)  # this array's data reached the disk; then it is full
            if f"/{step}{TMP}" in repr((args, kwargs)):
                raise error()
            return None

        m.setattr(serialization, "async_serialize_from_host", failing)

    return inject


def _merge(m, step):
    real = ocdbt_utils.merge_ocdbt_per_process_files

    async def failing(directory, *args, **kwargs):
        if f"/{step}{TMP}" in str(directory):
            raise _enospc(directory)
        return await real(directory, *args, **kwargs)

    m.setattr(ocdbt_utils, "merge_ocdbt_per_process_files", failing)


def _text_file(name):
    def inject(m, step):
        real = async_path.write_text

        async def failing(path, text):
            if path.name == name and f"/{step}{TMP}" in str(path):
                raise _enospc(path)
            return await real(path, text)

        m.setattr(async_path, "write_text", failing)

    return inject


# What TensorStore raised when a real disk filled up under an array write (tmpfs, this
# TensorStore version), paths shortened.
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/1.0" in OCDBT database at local file "/w/checkpoints/'
    '8.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/'
    'checkpoints/8.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/2b9d": '
    "Failed to write 237799 bytes to file 14: No space left on device [os_error_code='28']"
)

INJECTIONS = {
    "array data (OSError)": _array_write(lambda: _enospc("/w/d/1f")),
    "array data (TensorStore's report)": _array_write(lambda: ValueError(TENSORSTORE_ENOSPC)),
    "merging the per-process OCDBT trees": _merge,
    "state/_METADATA": _text_file("_METADATA"),
    "a commit marker, before the rename": _text_file("commit_success.txt"),
}


@pytest.mark.parametrize("inject", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, inject, capfd):
    mesh = _mesh()
    s4, s8 = _big_state(mesh, 4), _big_state(mesh, 8)
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(tmp_path, every=4, keep=2) as ckpt:
        assert ckpt.save(4, s4, {"step": 4})
        before = _contents(ckpt_dir / "4")
        with pytest.MonkeyPatch.context() as m:
            inject(m, 8)
            with pytest.raises(CheckpointWriteError) as info:
                ckpt.save(8, s8, {"step": 8})
        assert str(info.value) == (
            f"step 8: writing the checkpoint to {ckpt_dir} failed (No space left on device); "
            "checkpoint 4 is intact: free space and run the same command to resume"
        )
        # Nothing of the failed write is left; checkpoint 4 is byte for byte as it was.
        assert sorted(os.listdir(ckpt_dir)) == ["4"]
        assert _contents(ckpt_dir / "4") == before
        assert ckpt.all_steps() == [4]
        # The same Checkpointer writes again once there is space.
        assert ckpt.save(8, s8, {"step": 8}) and ckpt.all_steps() == [4, 8]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    shutil.rmtree(ckpt_dir / "8")
    # What a resumed run (a new process) gets: checkpoint 4, bit for bit.
    with Checkpointer(tmp_path, every=4, keep=2) as ckpt:
        restored, meta, step = ckpt.restore_latest(_big_state(mesh, 0))
    assert (step, meta, ckpt.skipped) == (4, {"step": 4}, [])
    _assert_identical(restored, s4)


def test_full_disk_on_the_first_checkpoint(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt, pytest.MonkeyPatch.context() as m:
        _array_write(_enospc)(m, 3)
        with pytest.raises(CheckpointWriteError, match=r"^step 3: .*") as info:
            ckpt.save(3, _big_state(_mesh(), 3), {"step": 3})
    assert str(info.value).endswith(
        "failed (No space left on device); no earlier checkpoint exists: free space and run "
        "the same command"
    )
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EDQUOT, "(Disk quota exceeded); checkpoint 1 is intact: free space (or raise"),
        (errno.EIO, "(Input/output error); checkpoint 1 is intact: check the disk and run"),
        (errno.EROFS, "(Read-only file system); checkpoint 1 is intact: make the file system"),
    ],
)
def test_other_disk_faults_name_their_reason(tmp_path, code, advice):
    state = _big_state(_mesh(), 1)
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, state, {"step": 1})
        with pytest.MonkeyPatch.context() as m:
            _array_write(lambda: OSError(code, os.strerror(code)))(m, 2)
            with pytest.raises(CheckpointWriteError) as info:
                ckpt.save(2, state, {"step": 2})
        assert advice in str(info.value) and "\n" not in str(info.value)
        assert ckpt.all_steps() == [1]


def test_an_error_that_is_not_a_disk_fault_propagates_unchanged(tmp_path):
    state = _big_state(_mesh(), 1)
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, state, {"step": 1})
        with pytest.MonkeyPatch.context() as m:
            _array_write(lambda: KeyError("a bug"))(m, 2)
            with pytest.raises(KeyError, match="a bug"):
                ckpt.save(2, state, {"step": 2})
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_asynchronous_write_fault_is_raised_by_close(tmp_path):
    mesh = _mesh()
    s1 = _big_state(mesh, 1)
    ckpt = Checkpointer(tmp_path, every=1, async_save=True)
    ckpt.save(1, s1, {"step": 1})
    with pytest.MonkeyPatch.context() as m:
        _array_write(_enospc)(m, 2)
        ckpt.save(2, _big_state(mesh, 2), {"step": 2})  # returns while the write goes on
        with pytest.raises(CheckpointWriteError, match=r"^step 2: .*checkpoint 1 is intact"):
            ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    with Checkpointer(tmp_path, every=1) as fresh:
        restored, _, step = fresh.restore_latest(_big_state(mesh, 0))
    assert step == 1
    _assert_identical(restored, s1)


def test_a_temporary_folder_left_by_a_killed_run_is_removed_at_start(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _big_state(_mesh(), 1), {"step": 1})
    leftover = tmp_path / "checkpoints" / f"2{TMP}" / "state" / "d"
    leftover.mkdir(parents=True)
    (leftover / "data").write_bytes(bytes(1000))
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.all_steps() == [1]
        ckpt.save(2, _big_state(_mesh(), 2), {"step": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


# A subprocess in its own user and mount namespace, on a 1 MiB tmpfs. For each amount of free
# space left before checkpoint 2 (so that the disk fills up at different stages of the write:
# the array data, the zarr metadata, the shardings file, the JSON items), a fresh work dir.
FULL_DISK_WORKER = """
import json, os, shutil, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from contrastive.run.checkpoint import Checkpointer, CheckpointWriteError
from contrastive.run.state_digest import state_digest

mnt = sys.argv[1]
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
def state(seed):  # 100 kB of random float32: zstd cannot shrink it
    w = jax.random.normal(jax.random.key(seed), (256, 100))
    w = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    return {"w": w, "key": jax.random.key(seed)}
results = []
for free in [int(x) for x in sys.argv[2:]]:
    out = {"free": free}
    workdir, ballast = os.path.join(mnt, "w"), os.path.join(mnt, "ballast")
    with Checkpointer(workdir, every=1) as ckpt:
        ckpt.save(1, state(1), {"step": 1})
        st = os.statvfs(workdir)
        with open(ballast, "wb") as f:
            f.write(bytes(max(st.f_bavail * st.f_frsize - free, 0)))
        try:
            ckpt.save(2, state(2), {"step": 2})
        except CheckpointWriteError as e:
            out["error"] = str(e).replace(workdir, "WORKDIR")
        out["listing"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with Checkpointer(workdir, every=1) as ckpt:
        restored, meta, step = ckpt.restore_latest(state(0))
        out["restored"] = [step, state_digest(restored) == state_digest(state(1))]
        os.remove(ballast)  # space freed: the same step is written
        out["saved_again"] = bool(ckpt.save(2, state(2), {"step": 2}))
        out["verified"] = state_digest(ckpt.restore(2, state(0))[0]) == state_digest(state(2))
    shutil.rmtree(workdir)
    results.append(out)
print("RESULT " + json.dumps(results), flush=True)
"""

FREE_BYTES = [1_000, 6_000, 8_000, 12_000, 20_000, 60_000]


def _can_mount_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = f"mount -t tmpfs -o size=1m tmpfs {where} && touch {where}/x"
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_real_full_disk(tmp_path):
    """A real ENOSPC from TensorStore or the OS, at several stages of the write: one line, no
    traceback, nothing left, checkpoint 1 restores, and the step is written once space is
    freed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # Linux user namespaces (unshare -rm) give a real, small file system to fill; CI's machines
    # have them, as this one does.
    assert _can_mount_tmpfs(mnt), "cannot mount a small tmpfs here (needs user namespaces)"
    script = f'mount -t tmpfs -o size=1m tmpfs {mnt} && exec "{sys.executable}" -c "$0" "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, FULL_DISK_WORKER, str(mnt)]
        + [str(b) for b in FREE_BYTES],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    assert [r["free"] for r in results] == FREE_BYTES
    for r in results:
        assert r["error"] == (
            "step 2: writing the checkpoint to WORKDIR/checkpoints failed (No space left on "
            "device); checkpoint 1 is intact: free space and run the same command to resume"
        ), r
        assert r["listing"] == ["1"], r
        assert r["restored"] == [1, True], r
        assert r["saved_again"] and r["verified"], r
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]


# --- files no checkpoint references -----------------------------------------------------------


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _d_files(step_dir: Path) -> list[Path]:
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


def _without_cleanup(m):
    m.setattr(Checkpointer, "_remove_unreferenced", lambda self: None)


def test_unreferenced_files_are_the_superseded_process_trees(tmp_path):
    """Written without the cleanup: exactly the per-process manifest and b-tree nodes are
    unreferenced, deleting them leaves a checkpoint that restores and verifies, and every
    file that stays is needed (deleting any one of them fails the restore)."""
    mesh = _mesh()
    state = _big_state(mesh, 3)
    with pytest.MonkeyPatch.context() as m, Checkpointer(tmp_path / "w", every=1) as ckpt:
        _without_cleanup(m)
        ckpt.save(3, state, {"step": 3})
    step_dir = tmp_path / "w" / "checkpoints" / "3"
    size = _size(step_dir)
    listed = [Path(f) for f in unreferenced_files(step_dir)]
    process = step_dir / "state" / "ocdbt.process_0"
    assert process / "manifest.ocdbt" in listed
    assert [f for f in listed if f.name != "manifest.ocdbt"], "no superseded b-tree node found"
    assert all(f.parent == process / "d" for f in listed if f.name != "manifest.ocdbt")
    for f in listed:
        f.unlink()
    assert _size(step_dir) < size
    assert unreferenced_files(step_dir) == []
    with Checkpointer(tmp_path / "w", every=1) as ckpt:
        restored, _ = ckpt.restore(3, _big_state(mesh, 0))  # verifies the digests
    _assert_identical(restored, state)
    # Necessary: each data file that stays is read by the restore.
    kept = _d_files(step_dir)
    assert len(kept) >= 2  # the root tree's node, the per-process value file
    for i, f in enumerate(kept):
        trial = tmp_path / f"trial{i}"
        shutil.copytree(tmp_path / "w", trial)
        (trial / f.relative_to(tmp_path / "w")).unlink()
        with Checkpointer(trial, every=1) as ckpt, pytest.raises(CheckpointCorruptError):
            ckpt.restore(3, _big_state(mesh, 0))


def test_saves_remove_unreferenced_files_after_the_rotation(tmp_path):
    mesh = _mesh()
    states = {s: _big_state(mesh, s) for s in (1, 2, 3, 4)}
    with pytest.MonkeyPatch.context() as m, Checkpointer(tmp_path / "plain", every=1) as ckpt:
        _without_cleanup(m)
        for s, state in states.items():
            ckpt.save(s, state, {"step": s})
    with Checkpointer(tmp_path / "w", every=1, keep=2) as ckpt:
        for s, state in states.items():
            ckpt.save(s, state, {"step": s})
            for kept in ckpt.all_steps():
                assert unreferenced_files(tmp_path / "w" / "checkpoints" / str(kept)) == []
        assert ckpt.all_steps() == [3, 4]
        for s in (3, 4):
            _assert_identical(ckpt.restore(s, _big_state(mesh, 0))[0], states[s])
            plain = tmp_path / "plain" / "checkpoints" / str(s)
            assert _size(tmp_path / "w" / "checkpoints" / str(s)) < _size(plain)
    assert not list((tmp_path / "w").rglob("ocdbt.process_*/manifest.ocdbt"))


def test_resume_removes_the_unreferenced_files_of_an_earlier_run(tmp_path, caplog):
    """Checkpoints written without the cleanup (an earlier version, or a kill between the
    write and the cleanup): a resume cleans every kept one, and leaves a damaged one as it is
    (with one line), for its restore to report."""
    mesh = _mesh()
    states = {s: _big_state(mesh, s) for s in (1, 2, 3)}
    with pytest.MonkeyPatch.context() as m, Checkpointer(tmp_path, every=1) as ckpt:
        _without_cleanup(m)
        for s, state in states.items():
            ckpt.save(s, state, {"step": s})
    ckpt_dir = tmp_path / "checkpoints"
    # Damage checkpoint 1: its root tree's node is gone.
    (ckpt_dir / "1" / "state" / "d").joinpath(
        os.listdir(ckpt_dir / "1" / "state" / "d")[0]
    ).unlink()
    damaged = _contents(ckpt_dir / "1")
    sizes = {s: _size(ckpt_dir / str(s)) for s in (2, 3)}
    with Checkpointer(tmp_path, every=1) as ckpt:
        _, _, step = ckpt.restore_latest(_big_state(mesh, 0))
        assert step == 3
        for s in (2, 3):
            assert unreferenced_files(ckpt_dir / str(s)) == []
            assert _size(ckpt_dir / str(s)) < sizes[s]
            _assert_identical(ckpt.restore(s, _big_state(mesh, 0))[0], states[s])
    assert _contents(ckpt_dir / "1") == damaged
    warned = [r.getMessage() for r in caplog.records if "not removed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("checkpoint 1: unreferenced files not")
    assert "\n" not in warned[0]


TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
port, pid, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
    initialization_timeout=60, heartbeat_timeout_seconds=20, shutdown_timeout_seconds=20,
)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from contrastive.run.checkpoint import Checkpointer

mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
def state(scale):
    host = np.arange(100_000.0, dtype=np.float32).reshape(1000, 100) * scale
    w = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("data")), host.__getitem__)
    return {"w": w}
with Checkpointer(workdir, every=1, keep=2) as ckpt:
    for step in (1, 2, 3):
        ckpt.save(step, state(step), {"step": step})
print("SAVED", flush=True)
"""


@pytest.mark.slow
def test_two_processes_leave_no_unreferenced_files(tmp_path):
    """Each process writes its own OCDBT tree; process 0 removes what the merged tree does not
    reference in all of them, and the checkpoints restore here, on one process."""
    from tests import processes

    env = {**os.environ, "PYTHONPATH": str(processes.REPO)}
    env.pop("XLA_FLAGS", None)
    port = processes.free_port()
    cmds = [
        [sys.executable, "-c", TWO_PROCESS_WORKER, str(port), str(i), str(tmp_path)]
        for i in range(2)
    ]
    for code, log in processes.finish(processes.start(cmds, env), timeout=240):
        assert code == 0 and "SAVED" in log, log[-3000:]
    mesh = _mesh()
    template = {"w": jax.device_put(jnp.zeros((1000, 100)), NamedSharding(mesh, PartitionSpec()))}
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.all_steps() == [2, 3]
        for step in (2, 3):
            step_dir = tmp_path / "checkpoints" / str(step)
            processes_dirs = sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*"))
            assert processes_dirs == ["ocdbt.process_0", "ocdbt.process_1"]
            assert unreferenced_files(step_dir) == []
            assert not list(step_dir.rglob("ocdbt.process_*/manifest.ocdbt"))
            restored, _ = ckpt.restore(step, template)  # verifies the digests
            want = np.arange(100_000.0, dtype=np.float32).reshape(1000, 100) * step
            np.testing.assert_array_equal(np.asarray(restored["w"]), want)


@hsettings(max_examples=4)
@given(
    devices=st.sampled_from([1, 2, 4, 8]),
    leaves=st.lists(
        st.tuples(
            st.integers(1, 96),  # rows per device
            st.integers(1, 40),  # columns
            st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int32]),
        ),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_any_state_restores_bit_identically_after_the_cleanup(
    tmp_path_factory, devices, leaves, seed
):
    """Inline (< 1 kB) and indirect values, several arrays, 1 to 8 shards: after the save's
    cleanup nothing unreferenced is left, and the restore is bit-identical."""
    workdir = tmp_path_factory.mktemp("any")
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    key = jax.random.key(seed)
    state = {"key": key}
    for i, (rows, cols, dtype) in enumerate(leaves):
        x = jax.random.normal(jax.random.fold_in(key, i), (rows * devices, cols)) * 100
        state[f"x{i}"] = jax.device_put(x.astype(dtype), NamedSharding(mesh, PartitionSpec("data")))
    with Checkpointer(workdir, every=1) as ckpt:
        ckpt.save(1, state, {"step": 1})
        assert unreferenced_files(workdir / "checkpoints" / "1") == []
        template = jax.tree_util.tree_map(jnp.zeros_like, state)
        template["key"] = jax.random.key(0)
        restored, _ = ckpt.restore(1, template)
    _assert_identical(restored, state)


@hsettings(max_examples=10)
@given(
    commits=st.lists(
        st.lists(st.tuples(st.integers(0, 30), st.integers(0, 200)), min_size=1, max_size=6),
        min_size=1,
        max_size=12,
    ),
)
def test_the_walk_reaches_every_node_of_a_deep_database(tmp_path_factory, commits):
    """A TensorStore OCDBT database with tiny nodes (a b-tree of several levels) and many
    versions (version-tree nodes): every file is reachable from its manifest, so nothing is
    listed; a walk that skipped inner or version nodes would list their files."""
    step_dir = tmp_path_factory.mktemp("deep")
    config = {"max_inline_value_bytes": 16, "max_decoded_node_bytes": 256}
    store = ts.KvStore.open(
        {
            "driver": "ocdbt",
            "config": {**config, "version_tree_arity_log2": 1},
            "base": f"file://{step_dir}/state/",
        }
    ).result()
    want = {}
    for commit in commits:
        txn = ts.Transaction()
        for key, size in commit:
            k, v = b"k%03d" % key, os.urandom(size)
            store.with_transaction(txn)[k] = v
            want[k] = v
        txn.commit_sync()
    assert unreferenced_files(step_dir) == []
    assert all(store[k] == v for k, v in want.items())


# --- the training loop ---------------------------------------------------------------------


@pytest.mark.slow
def test_train_ends_with_one_line_and_the_same_command_resumes(tmp_path, capsys):
    from contrastive.data import prepare_digits
    from experiments import train
    from tests.test_train_entry import FAST

    data = tmp_path / "tfds"
    prepare_digits(data)
    argv = ["--workdir", str(tmp_path / "w"), "--data-dir", str(data), *FAST]
    with pytest.MonkeyPatch.context() as m:
        _array_write(_enospc)(m, 8)
        assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "step 8: writing the checkpoint to "
        f"{tmp_path / 'w' / 'checkpoints'} failed (No space left on device); checkpoint 4 is "
        "intact: free space and run the same command to resume"
    ), err
    assert "Traceback" not in "\n".join(err)
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4"]
    assert train.main(argv) == 0
    assert max(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints")) == 16


def test_orbax_still_writes_the_layout_this_cleanup_reads(tmp_path):
    """The cleanup relies on orbax writing per-process OCDBT trees merged into a root one;
    if a new orbax changed that, this says so first."""
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _big_state(_mesh(), 1), {"step": 1})
    state_dir = tmp_path / "checkpoints" / "1" / "state"
    assert (state_dir / "manifest.ocdbt").is_file()
    assert sorted(p.name for p in state_dir.glob("ocdbt.process_*")) == ["ocdbt.process_0"]
