"""The training entry point: bad configurations fail fast, and resumed runs are exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from contrastive.configs import ConfigError, parse_config
from contrastive.data import prepare_digits
from contrastive.run import assemble, loop
from experiments import train

REPO = Path(__file__).resolve().parents[1]

# A small, fast run: MLP encoder, 16 steps of 32 pairs, checkpoints every 4 steps.
FAST = [
    "--model", "mlp", "--width", "32", "--embed-dim", "16", "--head-hidden", "none",
    "--batch-size", "32", "--steps", "16", "--checkpoint-every", "4", "--log-every", "1",
    "--warmup-steps", "2", "--eval-examples", "128", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare_digits(d)
    return str(d)


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"each step is logged once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: its per-step losses, final record and work dir (tests that need
    a finished run start from a copy of it)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    records = loop.train(parse_config(["--workdir", str(workdir), "--data-dir", data_dir, *FAST]))
    return _losses(workdir), records[-1], workdir


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, data_dir):
    """``{n: work dir}`` of runs stopped by ``--stop-after n``, each trained once for the
    module; tests resume a copy (a run may move: paths are not part of its identity)."""
    runs: dict[int, Path] = {}

    def get(stop_after: int) -> Path:
        if stop_after not in runs:
            workdir = tmp_path_factory.mktemp(f"stopped{stop_after}")
            args = ["--workdir", str(workdir), "--data-dir", data_dir, *FAST]
            loop.train(parse_config([*args, "--stop-after", str(stop_after)]))
            runs[stop_after] = workdir
        return runs[stop_after]

    return get


def _copy_run(source: Path, workdir: Path, data_dir: str) -> list[str]:
    """Copy the run in ``source`` into ``workdir``; the arguments that continue it there."""
    shutil.copytree(source, workdir, dirs_exist_ok=True)
    return ["--workdir", str(workdir), "--data-dir", data_dir, *FAST]


def test_uninterrupted_run_writes_metrics_and_checkpoints(reference, tmp_path):
    losses, final, _ = reference
    assert sorted(losses) == list(range(1, 17))
    assert all(isinstance(v, float) for v in losses.values())
    assert all(0.0 < v < 100.0 for v in losses.values())
    assert 0.0 <= final["linear_probe"] <= 1.0 and 0.0 <= final["knn"] <= 1.0


@pytest.mark.parametrize("stop_after", [6, 8])  # between checkpoints, and right on one
def test_resume_gives_identical_losses(reference, stopped_runs, data_dir, tmp_path, stop_after):
    args = _copy_run(stopped_runs(stop_after), tmp_path, data_dir)
    assert max(_losses(tmp_path)) == stop_after
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == 4 * (stop_after // 4)
    records = loop.train(parse_config(args))  # started again: resumes from the checkpoint
    assert _losses(tmp_path) == reference[0]  # exactly equal, every step
    assert records[-1]["linear_probe"] == reference[1]["linear_probe"]


def test_finished_run_does_nothing_more(reference, data_dir, tmp_path):
    args = _copy_run(reference[2], tmp_path, data_dir)
    before = (tmp_path / "metrics.jsonl").read_text()
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    loop.train(parse_config(args))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints


def test_other_run_in_workdir_is_refused(stopped_runs, data_dir, tmp_path):
    args = _copy_run(stopped_runs(6), tmp_path, data_dir)
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        loop.train(parse_config([*args, "--loss", "decoupled"]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "softmax"], "unknown --loss 'softmax': use one of infonce, sigmoid, decoupled"),
        (["--batch-size", "12"], "--batch-size 12 is not divisible by the 8 devices"),
        (["--batch-size", "32", "--chunk-size", "64"], "--chunk-size 64 is larger than"),
        (["--dataset", "cifar10"], "dataset 'cifar10' .* is not prepared in"),
        (["--dataset", "imagenet"],
         "--dataset: unknown dataset 'imagenet': use one of .* or a directory prepared by "
         "python -m experiments.prepare_pairs"),
        (["--model", "transformer"], "unknown --model"),
        (["--optimizer", "sgd"], "unknown --optimizer"),
        (["--sigma", "0.5"], "--sigma .* is an option of the decoupled loss"),
        (["--loss", "sigmoid", "--intra-view"], "--intra-view is for the softmax losses"),
    ],
)  # fmt: skip
def test_bad_configuration_is_one_line(flags, message, tmp_path, capsys):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    argv = ["--workdir", str(tmp_path / "w"), "--data-dir", str(empty), *FAST, *flags]
    t0 = time.perf_counter()
    assert train.main(argv) == 2
    assert time.perf_counter() - t0 < 10  # before any compilation or training
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--workdir", "x", "--steps", "ten"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--steps" in err


def _env() -> dict[str, str]:
    # The same numerics as this test process (tests/conftest.py): 8 CPU devices, full
    # precision float32 matmuls.
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    return env


def test_cli_error_in_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path), "--loss", "nce"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown --loss 'nce'")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.slow
def test_image_text_run_on_mocked_coco(tmp_path):
    """--dataset coco_captions: image and text towers, retrieval recall at the end."""
    import tensorflow_datasets as tfds

    from tests.test_data import _coco_metadata

    meta = tmp_path / "meta"
    _coco_metadata(meta)
    args = ["--workdir", str(tmp_path / "w"), "--dataset", "coco_captions", "--image-size", "16",
            "--model", "mlp", "--width", "32", "--embed-dim", "16", "--text-len", "8",
            "--vocab-size", "64", "--loss", "sigmoid", "--batch-size", "8", "--steps", "3",
            "--warmup-steps", "1", "--checkpoint-every", "3", "--log-every", "1",
            "--no-progress"]  # fmt: skip
    with tfds.testing.mock_data(
        num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(meta)
    ):
        records = loop.train(parse_config(args))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@10"} <= set(records[-1])
    assert "bias" in records[-1]  # the sigmoid loss learns its bias


# --- runs that lose nothing ----------------------------------------------------------------


def _stopped_run(stopped_runs, tmp_path, data_dir, stop_after=6):
    """A copy in ``tmp_path`` of the run stopped after ``stop_after``; its arguments."""
    return _copy_run(stopped_runs(stop_after), tmp_path, data_dir)


@pytest.mark.slow
def test_changed_settings_are_refused_before_any_restore(stopped_runs, data_dir, tmp_path, capsys):
    """Every setting that changes the computation is part of the run's identity; the error
    names each differing flag with its old and new value, and nothing was restored."""
    args = _stopped_run(stopped_runs, tmp_path, data_dir)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    changes = [
        (["--learning-rate", "0.02"], "--learning-rate 0.002 -> 0.02"),
        (["--intra-view"], "--intra-view False -> True"),
        (["--no-symmetric"], "--symmetric True -> False"),
        (["--dropout", "0.3"], "--dropout 0.0 -> 0.3"),
        (["--warmup-steps", "3"], "--warmup-steps 2 -> 3"),
        (["--weight-decay", "0.5"], "--weight-decay 0.0001 -> 0.5"),
        (["--no-learn-temperature"], "--learn-temperature True -> False"),
        (["--chunk-size", "8"], "--chunk-size None -> 8"),
        (["--loss", "sigmoid"], "--loss 'infonce' -> 'sigmoid'"),
        (["--clip-norm", "none"], "--clip-norm 1.0 -> None"),
        (["--shard-optimizer"], "--shard-optimizer False -> True"),
    ]
    for flags, message in changes:
        assert train.main([*args, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds a run with other settings" in err, err
        assert message in err, (flags, err)
    # Harmless settings may change: the run resumes and finishes.
    assert train.main([*args, "--log-every", "3", "--no-progress", "--eval-examples", "64"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) != before


def test_divergence_stops_before_saving_it(data_dir, tmp_path, capsys):
    """--learning-rate 1e6: the run ends non-zero within a few steps, naming the non-finite
    metric, and every checkpoint left on disk restores to finite parameters."""
    argv = ["--workdir", str(tmp_path), "--data-dir", data_dir, *FAST, "--learning-rate", "1e6",
            "--checkpoint-every", "1"]  # fmt: skip
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err, err
    step = int(re.search(r"step (\d+):", err).group(1))
    assert step <= 8
    assert re.search(r"(loss|grad_norm) = (nan|inf)|the new state", err), err
    from contrastive.run.checkpoint import Checkpointer

    s = assemble.setup(parse_config(argv))
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.all_steps() and max(ckpt.all_steps()) < step
        restored, meta, at = ckpt.restore_latest({"train": s.state, "key": s.key})
    assert at == max(ckpt.all_steps())
    leaves = jax.tree_util.tree_leaves(restored["train"])
    assert all(bool(np.all(np.isfinite(a))) for a in leaves if np.issubdtype(a.dtype, np.floating))


def _data_files(checkpoint: Path) -> list[Path]:
    return [p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def test_corrupted_latest_checkpoint_falls_back(
    reference, stopped_runs, data_dir, tmp_path, caplog
):
    """64 bytes flipped in the middle of the newest checkpoint's data files: the restart
    says so in one line, resumes from the one before, and ends with the same losses.

    Every OCDBT data file is hit: this state is small, so which file holds the arrays (and
    which only the superseded, unreferenced b-tree nodes of the process-local tree) varies
    from run to run; a flip in an unreferenced file is harmless and rightly goes unnoticed.
    ``tests/test_checkpoint.py`` flips a single file that is known to hold an array.
    """
    args = _stopped_run(stopped_runs, tmp_path, data_dir, stop_after=8)
    for victim in _data_files(tmp_path / "checkpoints" / "8"):
        data = bytearray(victim.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        victim.write_bytes(bytes(data))
    assert train.main(args) == 0
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert warned and warned[0].startswith("checkpoint 8 unusable") and "trying 4" in warned[0]
    assert len(warned[0].splitlines()) == 1
    assert _losses(tmp_path) == reference[0]


def test_torn_metrics_line_is_dropped_on_resume(reference, stopped_runs, data_dir, tmp_path):
    args = _stopped_run(stopped_runs, tmp_path, data_dir)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.1')  # the disk filled up mid-line
    loop.train(parse_config(args))
    assert _losses(tmp_path) == reference[0]


@pytest.mark.parametrize("damage", ["torn last line", "emptied"])
def test_finished_run_with_a_damaged_log_gets_its_final_record_back(
    reference, data_dir, tmp_path, capsys, damage
):
    """The final record of a finished run lost to a kill is evaluated again from the final
    checkpoint, and one line says which records were lost."""
    args = _copy_run(reference[2], tmp_path, data_dir)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    kept = lines[:-1] if damage == "torn last line" else []
    path.write_text("\n".join(kept) + ("\n" if kept else "") + lines[-1][:20])
    capsys.readouterr()
    records = loop.train(parse_config(args))
    err = capsys.readouterr().err.strip().splitlines()
    lost = "step 16" if damage == "torn last line" else "steps 1-16"
    assert err == [
        f"metrics.jsonl had lost the records of {lost} (torn by a kill); the checkpoint of step "
        "16 is intact; its final evaluation is computed again"
    ]
    final = records[-1]
    assert final["step"] == 16 and final["recovered_from_checkpoint"] is True
    # the same evaluation as the uninterrupted run's: the state is the same
    assert final["linear_probe"] == reference[1]["linear_probe"]
    assert final["knn"] == reference[1]["knn"]


def test_busy_workdir_is_refused(data_dir, tmp_path, capsys):
    from contrastive.run.run_guard import WorkdirLock

    argv = ["--workdir", str(tmp_path), "--data-dir", data_dir, *FAST]
    with WorkdirLock(tmp_path, process_index=0):
        assert train.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(os.getpid()) in err, err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("make", "flags", "message"),
    [
        ("file", ["--workdir", "{p}"], "--workdir .* is a file"),
        (None, ["--data-dir", "{p}/no/such/parent/tfds"], "--data-dir .* does not exist"),
    ],
)
def test_bad_paths_are_one_line(make, flags, message, tmp_path, capsys):
    p = tmp_path / "f"
    if make == "file":
        p.write_text("not a directory")
    argv = ["--workdir", str(tmp_path / "w"), *FAST, *[f.format(p=p) for f in flags]]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "no").exists()


def test_warmup_as_long_as_the_run_is_a_valid_schedule():
    from contrastive.step.optim import make_schedule
    from contrastive.step_configs import OptimConfig

    sched = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=20, total_steps=20))
    np.testing.assert_allclose([sched(0), sched(10), sched(20)], [0.0, 0.5, 1.0], atol=1e-6)
    assert parse_config(["--workdir", "x", "--steps", "20"]).train.optim.warmup == 20
    assert parse_config(["--workdir", "x", "--steps", "10"]).train.optim.warmup == 10


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert condition(), f"the run ended (exit {proc.poll()}) before {what}"


@pytest.mark.slow
def test_sigterm_then_sigkill_then_the_same_command_gives_identical_losses(
    reference, data_dir, tmp_path
):
    """Real signals to the training command, then the same command again, twice: SIGTERM
    between checkpoints (the step finishes, a checkpoint is written, exit 0 with a line
    saying so); then SIGKILL of the resumed run right after its next checkpoint. The last
    start ends with the uninterrupted losses. (Three starts of the command, not four: the
    resume after the SIGTERM is the run the SIGKILL interrupts.)"""
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path),
           "--data-dir", data_dir, *FAST]  # fmt: skip
    metrics, ckpt_dir = tmp_path / "metrics.jsonl", tmp_path / "checkpoints"

    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(
            proc,
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5,
            "step 5",
        )
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", out)
    assert stopped, out[-2000:]
    step = int(stopped.group(1))
    assert (ckpt_dir / str(step)).is_dir()
    assert max(_losses(tmp_path)) == step

    # The same command resumes from `step`; killed once its next regular checkpoint is
    # complete (renamed into place), before the end of the run.
    target = 4 * (step // 4) + 4
    assert target < 16, f"SIGTERM after step {step} leaves no checkpoint to kill after"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.DEVNULL)
    try:
        _wait_for(proc, (ckpt_dir / str(target)).is_dir, f"checkpoint {target}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL  # it had not finished: a real kill

    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(tmp_path) == reference[0]


def test_hard_negative_batches_follow_the_ring_layout():
    """--hard-negatives 2 on 8 devices: each device's caption rows are its 2 images' own
    captions, then 4 captions one attribute away from them (with their caption ids)."""
    from contrastive.data import captioned_shapes as cs
    from contrastive.data import get_spec, train_dataset
    from contrastive.mesh import make_mesh

    cfg = parse_config(["--workdir", "x", "--dataset", "shapes", "--batch-size", "16",
                        "--hard-negatives", "2", "--skip-duplicate-negatives"])  # fmt: skip
    spec = get_spec("shapes")
    host = train_dataset("shapes", global_batch_size=16, seed=0)[3]
    build = assemble.batch_builder(cfg, spec, make_mesh())
    batch = build(host, 3)
    assert batch.x.shape == (16, 32, 32, 3) and batch.y.shape == (48, cs.TEXT_LEN)
    assert batch.ids.shape == (48,) and batch.valid is None
    np.testing.assert_array_equal(build(host, 3).y, batch.y)  # a pure function of the step
    for d in range(8):
        rows = slice(6 * d, 6 * d + 6)
        y, ids = batch.y[rows], batch.ids[rows]
        np.testing.assert_array_equal(y[:2], host["text"][2 * d : 2 * d + 2])
        np.testing.assert_array_equal(ids[:2], host["caption_id"][2 * d : 2 * d + 2])
        for j in range(2, 6):
            own = cs.caption_attributes(int(ids[(j - 2) // 2]))
            neg = cs.decode(y[j])
            assert cs.caption_id(*(neg[k] for k in cs.ATTRIBUTES)) == ids[j]
            assert sum(int(own[k]) != neg[k] for k in cs.ATTRIBUTES) == 1
    plain = assemble.batch_builder(
        parse_config(["--workdir", "x", "--dataset", "shapes", "--batch-size", "16"]),
        spec,
        make_mesh(),
    )(host, 3)
    assert plain.y.shape == (16, cs.TEXT_LEN) and plain.ids is None
    with pytest.raises(ConfigError, match="--hard-negatives needs a data set with caption ids"):
        parse_config(["--workdir", "x", "--hard-negatives", "2"])


def test_truncated_data_file_is_one_line_naming_it(data_dir, tmp_path, capsys):
    """A data file cut short (a full disk while it was copied) ends the command before training
    with one line that names the file, not a traceback mid-run."""
    data = tmp_path / "tfds"
    shutil.copytree(data_dir, data)  # prepared once for the module
    (train_file,) = data.glob("sklearn_digits/*/sklearn_digits-train.array_record*")
    raw = train_file.read_bytes()
    train_file.write_bytes(raw[: len(raw) // 2])
    argv = ["--workdir", str(tmp_path / "w"), "--data-dir", str(data), *FAST]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"data file {train_file} cannot be read" in err, err
