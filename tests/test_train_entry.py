"""The training entry point: bad configurations fail fast, and resumed runs are exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastive.data import prepare_digits
from experiments import train
from experiments.config import ConfigError, parse_config

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
    """An uninterrupted run: its per-step losses and final record."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    records = train.run(parse_config(["--workdir", str(workdir), "--data-dir", data_dir, *FAST]))
    return _losses(workdir), records[-1]


def test_uninterrupted_run_writes_metrics_and_checkpoints(reference, tmp_path):
    losses, final = reference
    assert sorted(losses) == list(range(1, 17))
    assert all(isinstance(v, float) for v in losses.values())
    assert all(0.0 < v < 100.0 for v in losses.values())
    assert 0.0 <= final["linear_probe"] <= 1.0 and 0.0 <= final["knn"] <= 1.0


@pytest.mark.parametrize("stop_after", [6, 8])  # between checkpoints, and right on one
def test_resume_gives_identical_losses(reference, data_dir, tmp_path, stop_after):
    args = ["--workdir", str(tmp_path), "--data-dir", data_dir, *FAST]
    train.run(parse_config([*args, "--stop-after", str(stop_after)]))
    assert max(_losses(tmp_path)) == stop_after
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == 4 * (stop_after // 4)
    records = train.run(parse_config(args))  # started again: resumes from the checkpoint
    assert _losses(tmp_path) == reference[0]  # exactly equal, every step
    assert records[-1]["linear_probe"] == reference[1]["linear_probe"]


def test_finished_run_does_nothing_more(reference, data_dir, tmp_path):
    args = ["--workdir", str(tmp_path), "--data-dir", data_dir, *FAST]
    train.run(parse_config(args))
    before = (tmp_path / "metrics.jsonl").read_text()
    train.run(parse_config(args))
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_other_run_in_workdir_is_refused(reference, data_dir, tmp_path):
    args = ["--workdir", str(tmp_path), "--data-dir", data_dir, *FAST]
    train.run(parse_config([*args, "--stop-after", "4"]))
    with pytest.raises(ConfigError, match="different run"):
        train.run(parse_config([*args, "--loss", "decoupled"]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "softmax"], "unknown --loss 'softmax': use one of infonce, sigmoid, decoupled"),
        (["--batch-size", "12"], "--batch-size 12 is not divisible by the 8 devices"),
        (["--batch-size", "32", "--chunk-size", "64"], "--chunk-size 64 is larger than"),
        (["--dataset", "cifar10"], "dataset 'cifar10' .* is not prepared in"),
        (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
        (["--model", "transformer"], "unknown --model"),
        (["--optimizer", "sgd"], "unknown --optimizer"),
        (["--sigma", "0.5"], "--sigma .* needs --loss decoupled"),
        (["--loss", "sigmoid", "--intra-view"], "--intra-view is for the softmax losses"),
    ],
)
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
    import re

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
def test_sigkill_then_restart_gives_identical_losses(reference, data_dir, tmp_path):
    """A real kill: SIGKILL the process after its second checkpoint, start it again."""
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path),
           "--data-dir", data_dir, *FAST]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpt_dir / "8").is_dir():  # renamed into place: the checkpoint is complete
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt_dir / "8").is_dir(), "the run did not reach its second checkpoint"
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(tmp_path) == reference[0]


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
        records = train.run(parse_config(args))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@10"} <= set(records[-1])
    assert "bias" in records[-1]  # the sigmoid loss learns its bias
