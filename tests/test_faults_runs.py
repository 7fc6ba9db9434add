"""Runs stopped, resumed, finished and interrupted say what is true.

Issue 32's cases about runs: features replaced between a stop and a resume (same shape, new
values) or of another width, and another device count, are refused in one line that says
what the checkpoints were written with (not "unusable"); a finished run's command says it is
finished; a clean exit leaves no ``run.lock.0``; TensorBoard's tags are ``metrics.jsonl``'s
names; ``<workdir>/tensorboard`` that is a file is one line before training; Ctrl-C while JAX
loads or while the run is set up is one line, exit 130, and leaves no work dir. And the
pins of what a user cannot see: a second resume from one step leaves one config record at
that step in the event files; the same step corrupted on several resumes in a row is moved
aside each time under its own name; with a cluster size that divides the data set the group
drawn last varies from epoch to epoch; the streamed source's example index on process 1 of 2
is the mesh's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from contrastive.configs import ConfigError, parse_config
from contrastive.inputs.hard_batches import HardBatchOrder
from contrastive.mesh import DATA_AXIS
from contrastive.run import loop
from contrastive.run.checkpoint import Checkpointer
from contrastive.run.metric_writers import TensorBoardWriter, read_events, read_scalars
from contrastive.step.streamed import sources as ss
from experiments import train
from tests.test_checkpoint import _big_state, _flip_middle, _mesh
from tests.test_faults_inputs import _one_line_error

REPO = Path(__file__).resolve().parents[1]

# A locked-tower run on a user's own features: 64 training examples, 3 steps of 16, a
# checkpoint every step, every device of the test session (8).
LOCKED = [
    "--dataset", "shapes", "--text-tower", "bag-of-words", "--train-examples", "64",
    "--batch-size", "16", "--steps", "3", "--warmup-steps", "1", "--eval-examples", "32",
    "--no-progress", "--checkpoint-every", "1", "--log-every", "1",
]  # fmt: skip


def _features(d: Path, *, width: int = 8, seed: int = 0) -> str:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(d / "train.npy", rng.normal(size=(64, width)).astype(np.float32))
    np.save(d / "test.npy", rng.normal(size=(2000, width)).astype(np.float32))
    return str(d)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, str]:
    """A run stopped after step 2 of 3 (as if killed): (its work dir, its features)."""
    base = tmp_path_factory.mktemp("stopped")
    feats = _features(base / "features")
    workdir = base / "run"
    assert train.main(["--workdir", str(workdir), *LOCKED, "--locked-image", feats,
                       "--stop-after", "2"]) == 0  # fmt: skip
    return workdir, feats


def _copy(stopped, tmp_path) -> tuple[Path, str]:
    """A copy of the stopped run's work dir (a run may move; its --locked-image may not)."""
    workdir = tmp_path / "run"
    shutil.copytree(stopped[0], workdir)
    return workdir, stopped[1]


@pytest.mark.slow  # the stopped run's fixture: it trains and stops a locked-tower run
@pytest.mark.parametrize("width", [8, 6], ids=["same shape, new values", "another width"])
def test_features_changed_between_stop_and_resume_are_refused(stopped, tmp_path, capsys, width):
    """Issue 32.2 and 32.14: new values of the same shape were taken without a word; another
    width was called "unusable checkpoints", advising to move them away."""
    workdir = tmp_path / "run"
    shutil.copytree(stopped[0], workdir)
    feats = Path(stopped[1])  # the same --locked-image (a setting), other files in it
    saved = tmp_path / "saved"
    shutil.copytree(feats, saved)
    try:
        _features(feats, width=width, seed=1)
        before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
        code = train.main(["--workdir", str(workdir), *LOCKED, "--locked-image", str(feats)])
    finally:
        shutil.rmtree(feats)
        shutil.copytree(saved, feats)
    line = _one_line_error(code, capsys.readouterr().err)
    assert line.startswith("error: the train features (sha256 "), line
    assert "changed since the checkpoints in" in line, line
    assert "the checkpoints are intact" in line and "unusable" not in line, line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert not (workdir / "checkpoints_unusable").exists()


@pytest.mark.slow  # the stopped run's fixture
def test_another_device_count_names_the_one_the_checkpoints_were_written_on(stopped, tmp_path):
    """Issue 32.14: resumed on 4 devices (no --num-devices: all the machine has) a run written
    on 8 was told its checkpoints were unusable. A process of its own: the device count is
    fixed when JAX starts."""
    workdir, feats = _copy(stopped, tmp_path)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(workdir), *LOCKED,
           "--locked-image", str(feats)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = _one_line_error(done.returncode, done.stderr)
    assert "were written on 8 devices and this run has 4 (they are intact)" in line, line
    assert "--num-devices 8" in line and "unusable" not in line
    assert not (workdir / "checkpoints_unusable").exists()


def test_check_same_run_passes_checkpoints_without_recorded_inputs():
    cfg = parse_config(["--workdir", "w"])
    loop.check_same_run({"config": cfg.identity()}, cfg, {"devices": 4})  # an older run
    with pytest.raises(ConfigError, match="written on 8 devices and this run has 4"):
        loop.check_same_run({"config": cfg.identity(), "inputs": {"devices": 8}}, cfg,
                            {"devices": 4})  # fmt: skip


@pytest.mark.slow  # the stopped run's fixture
def test_a_finished_run_says_so_and_leaves_no_lock_and_one_naming(stopped, tmp_path, capsys):
    """Small snags of issue 32: the command of a finished run printed its summary again
    without saying it was finished; a clean exit left an empty ``run.lock.0``; TensorBoard's
    tags (``i2t_r_1``) were not the summary's names (``i2t_r@1``)."""
    workdir, feats = _copy(stopped, tmp_path)
    argv = ["--workdir", str(workdir), *LOCKED, "--locked-image", str(feats)]
    assert train.main(argv) == 0  # steps 3
    out = capsys.readouterr()
    assert "holds a finished run" not in out.err
    assert not list(workdir.glob("run.lock*")), sorted(p.name for p in workdir.iterdir())
    assert train.main(argv) == 0  # nothing left to do
    again = capsys.readouterr()
    assert again.out == out.out  # the same summary line
    notes = [x for x in again.err.splitlines() if x.strip()]
    assert len(notes) == 1 and f"{workdir} holds a finished run" in notes[0], again.err
    assert "checkpoint 3" in notes[0]
    assert not list(workdir.glob("run.lock*"))
    # One naming: every number of metrics.jsonl is a TensorBoard tag of the same name.
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    names = {k for r in records for k, v in r.items() if isinstance(v, int | float)} - {"step"}
    tags = set(read_scalars(workdir / "tensorboard" / "train"))
    assert "i2t_r@1" in names and names == tags, names ^ tags
    assert "i2t_r@1" in out.out


def test_a_tensorboard_path_that_is_a_file_is_one_line_before_training(
    tmp_path, capsys, monkeypatch
):
    """Issue 32.12: ``<workdir>/tensorboard`` as a file raised NotADirectoryError after the
    setup (a read-only one: PermissionError)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "tensorboard").write_text("not a directory\n")
    monkeypatch.setattr(loop, "setup", _interrupt(RuntimeError("set-up reached")))
    code = train.main(["--workdir", str(workdir), "--no-progress"])
    line = _one_line_error(code, capsys.readouterr().err)
    assert f"{workdir}/tensorboard is a file" in line and "--no-tensorboard" in line, line


def _interrupt(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error

    return raise_it


def test_ctrl_c_while_the_run_is_set_up_is_one_line(tmp_path, capsys, monkeypatch):
    """Issue 32.13: Ctrl-C before the run's signal handling (reading data, pre-training) was
    a traceback and left an empty work dir."""
    monkeypatch.setattr(loop, "setup", _interrupt(KeyboardInterrupt()))
    code = train.main(["--workdir", str(tmp_path / "w"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert (
        err.strip().startswith("interrupted before training started")
        and len(err.strip().splitlines()) == 1
    ), err
    assert not (tmp_path / "w").exists()


def test_ctrl_c_while_jax_loads_is_one_line(tmp_path):
    """Issue 32.13: Ctrl-C during the imports printed a traceback (or an ImportError from
    inside jaxlib). SIGINT is sent 1 s after the start, while the command imports JAX (about
    2 s here; were it done, the run's set-up answers the same way)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path / "w")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted before training started")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ pins


def test_a_second_resume_from_one_step_leaves_one_config_record_there(tmp_path):
    def session(resume_from, steps):
        with TensorBoardWriter(tmp_path, resume_from_step=resume_from) as tb:
            tb.write_text("config", f"from {resume_from}")
            for s in steps:
                tb.write_scalars(s, {"loss": float(s)})

    session(None, range(1, 6))
    session(2, range(3, 5))  # killed after step 4, resumed from the checkpoint of step 2
    session(2, range(3, 7))  # killed again before step 3's checkpoint; resumed from 2 again
    texts = [
        (e.step, v.tag)
        for f in sorted(tmp_path.glob("events*"))
        for e in read_events(f)
        if e.HasField("summary")
        for v in e.summary.value
        if v.metadata.plugin_data.plugin_name == "text"
    ]
    at_two = [t for t in texts if t[0] == 2]
    assert len(at_two) == 1, texts
    assert [s for s, _ in read_scalars(tmp_path)["loss"]] == [1, 2, 3, 4, 5, 6]


def test_one_step_corrupted_on_several_resumes_is_moved_aside_each_time(tmp_path):
    mesh = _mesh()
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _big_state(mesh, 1), {"step": 1})
    names = []
    for attempt in range(3):
        with Checkpointer(tmp_path, every=1) as ckpt:
            ckpt.save(2, _big_state(mesh, 2 + attempt), {"step": 2, "attempt": attempt})
        _flip_middle(tmp_path / "checkpoints" / "2")
        with Checkpointer(tmp_path, every=1) as ckpt:
            _, meta, step = ckpt.restore_latest(_big_state(mesh, 0))
            assert step == 1 and ckpt.all_steps() == [1]
        names = sorted(p.name for p in (tmp_path / "checkpoints_unusable").iterdir())
        assert len(names) == attempt + 1, names
    assert names == ["2", "2.1", "2.2"]
    attempts = set()
    for name in names:
        metadata = tmp_path / "checkpoints_unusable" / name / "meta" / "metadata"
        attempts.add(json.loads(metadata.read_text())["attempt"])
    assert attempts == {0, 1, 2}  # each one kept, none overwritten


@pytest.mark.parametrize("n", [64, 72])  # B divides N, or not; the cluster size divides both
def test_the_group_drawn_last_varies_when_the_cluster_size_divides_the_data_set(n):
    b, c = 16, 4
    order = HardBatchOrder(n, b, c, seed=3, refresh_every=1)
    groups = np.arange(n) // c  # n / c full groups, none smaller
    order.set_clustering(groups, refresh_step=0)
    last = set()
    for epoch in range(8):
        rows = order.epoch_order(epoch)
        assert sorted(rows.tolist()) == list(range(n))  # every example once per epoch
        last.add(int(groups[rows[-1]]))
    assert len(last) > 1, last


def test_the_streamed_example_index_on_process_1_of_2_is_the_meshs(monkeypatch):
    """Process 1 of 2, devices 4..7 of an 8-device data axis: the examples its chunk rows read
    are the global batch rows the mesh gives those devices, not rows counted on the host."""
    devices = np.array([types.SimpleNamespace(process_index=i // 4) for i in range(8)])
    mesh = types.SimpleNamespace(shape={DATA_AXIS: 8}, devices=devices)
    monkeypatch.setattr(ss.jax, "process_index", lambda: 1)
    b, chunk = 32, 16
    layout = ss.chunk_layout((b, b), mesh, chunk_size=chunk)
    assert list(layout.local_devices) == [4, 5, 6, 7]
    rows = ss.example_rows(list(range(10_000)), collate=list, host_batch_size=b // 2,
                           process_index=1, process_count=2)  # fmt: skip
    for step in (0, 3):
        for k in range(layout.num_chunks):
            got = rows(step, layout.host_index(0, k))
            assert got == (step * b + layout.global_index(0, k)).tolist()
    assert jax.process_index() == 1  # the patch held (the module's jax is this jax)
