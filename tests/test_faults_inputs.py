"""Inputs the run did not compute itself are checked when read, and every bad one is one line.

Issue 32's cases about inputs, each tried the way a careless or hostile user would: a feature
cache whose bytes changed (finite values, or NaN), a pre-trained tower cache truncated,
corrupted or replaced by other values of the same shapes, a read-only cache, a user's feature
files that are empty, an ``.npz``, or of two widths, features near 1e30, a digits data file
with one flipped byte, a temperature the ceiling would clip, an evaluation growth within 1e-9
of 1, hard batches that would never come. The command's errors run the real entry point
(``experiments.train.main``) and are checked for the one line, the exit status, no traceback
and no work dir left behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contrastive.data import feature_cache as fc
from contrastive.data import prepare_digits
from contrastive.inputs.hard_batches import HardBatchOrder, first_hard_step
from contrastive.models import locked_tower as lt
from contrastive.run import loop
from experiments import train

# A locked-tower run on a user's own features: 64 training examples, 3 steps of 16.
LOCKED = [
    "--dataset", "shapes", "--text-tower", "bag-of-words", "--train-examples", "64",
    "--batch-size", "16", "--steps", "3", "--warmup-steps", "1", "--eval-examples", "32",
    "--no-progress", "--num-devices", "2",
]  # fmt: skip
TEST_EXAMPLES = 2000  # the shapes test split


def _features(d: Path, *, train_width: int = 8, test_width: int = 8, seed: int = 0) -> str:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(d / "train.npy", rng.normal(size=(64, train_width)).astype(np.float32))
    np.save(d / "test.npy", rng.normal(size=(TEST_EXAMPLES, test_width)).astype(np.float32))
    return str(d)


def _one_line_error(code: int, err: str, want_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == want_code, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class _Trap(BaseException):
    pass


def _trap(*args, **kwargs):
    raise _Trap("long work started")


# ------------------------------------------------------------------ the feature cache


def _cache_once(cache: Path, values: np.ndarray, calls: list[int]) -> np.ndarray:
    def compute():
        calls.append(1)
        return values

    return fc.cached_features(cache, {"t": 1}, {"w": np.ones(2, np.float32)}, "train", 40, compute)


def test_a_flipped_feature_cache_entry_is_recomputed_with_one_line(tmp_path, capsys):
    """Issue 32.1: the high byte of 222 floats flipped (every value still finite) was used as
    it was; the entry's sha256 now catches it, names the file, and the features are computed
    again."""
    values = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    calls: list[int] = []
    _cache_once(tmp_path, values, calls)
    (entry,) = tmp_path.glob("features-train-40-*.npy")
    raw = bytearray(entry.read_bytes())
    data_start = len(raw) - values.nbytes
    for i in range(222):  # little-endian float32: byte 3 is the high byte
        raw[data_start + 4 * i + 3] ^= 0x01
    entry.write_bytes(bytes(raw))
    assert np.all(np.isfinite(np.load(entry)))  # the damage is not visible as NaN
    capsys.readouterr()
    got = _cache_once(tmp_path, values, calls)
    np.testing.assert_array_equal(got, values)
    assert len(calls) == 2  # recomputed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(entry) in err[0] and "recomputed" in err[0], err
    # Rewritten: the next read is a silent hit.
    assert np.array_equal(_cache_once(tmp_path, values, calls), values) and len(calls) == 2
    assert capsys.readouterr().err == ""


def test_nan_in_a_cache_entry_is_a_damaged_entry_not_a_divergence(tmp_path, capsys):
    """NaN written into an entry together with a matching checksum (a hostile edit): named as
    a damaged entry and recomputed, never trained on."""
    values = np.ones((40, 8), np.float32)
    calls: list[int] = []
    _cache_once(tmp_path, values, calls)
    (entry,) = tmp_path.glob("features-train-40-*.npy")
    bad = values.copy()
    bad[3, 2] = np.nan
    np.save(entry, bad)
    meta_path = entry.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(entry.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    np.testing.assert_array_equal(_cache_once(tmp_path, values, calls), values)
    assert len(calls) == 2
    err = capsys.readouterr().err.strip()
    assert str(entry) in err and "non-finite" in err and "diverged" not in err, err


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fc.tempfile, "mkstemp", denied)
    with pytest.raises(fc.CacheWriteError) as info:
        _cache_once(tmp_path / "ro", np.ones((40, 8), np.float32), [])
    message = str(info.value)
    assert "\n" not in message and "cannot be written (Permission denied)" in message
    assert "--feature-cache" in message


# ------------------------------------------------------------------ the tower cache

FAST = lt.PretrainConfig(width=32, train_examples=256, test_examples=64, steps=20, batch_size=32)


@pytest.fixture(scope="module")
def tower_cache(tmp_path_factory) -> tuple[Path, str]:
    """A cache holding FAST's tower: (the directory, the tower's parameter digest)."""
    d = tmp_path_factory.mktemp("towers")
    pre = lt.pretrained_image_tower(FAST, cache_dir=d)
    return d, pre.info["params_sha256"]


def _copy_cache(tower_cache, tmp_path) -> Path:
    d = tmp_path / "cache"
    shutil.copytree(tower_cache[0], d)
    return d


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _same_shapes_other_values(path: Path) -> None:
    """Every leaf replaced by other values of its shape and dtype, with the checksum in the
    JSON updated too: only the parameter digest can tell."""
    with np.load(path) as stored:
        leaves = {k: np.asarray(stored[k]) for k in stored.files}
    other = {k: (v + 1).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in leaves.items()}
    np.savez(path.with_suffix(".tmp.npz"), **other)
    path.with_suffix(".tmp.npz").replace(path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _flip, _same_shapes_other_values])
def test_a_damaged_tower_cache_is_pre_trained_again(tower_cache, tmp_path, capsys, damage):
    """Issue 32.11: a truncated or corrupted ``tower-*.npz`` raised ``zipfile.BadZipFile``; a
    file of the same shapes with changed values must not be taken either. Each is one warning
    line naming the file, then the tower is pre-trained again (the same parameters)."""
    d = _copy_cache(tower_cache, tmp_path)
    (path,) = d.glob("tower-*.npz")
    damage(path)
    capsys.readouterr()
    pre = lt.pretrained_image_tower(FAST, cache_dir=d)
    assert not pre.info.get("from_cache")
    assert lt.params_digest(nnx.state(pre.tower)) == tower_cache[1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "pre-trained again" in err[0], err
    again = lt.pretrained_image_tower(FAST, cache_dir=d)  # rewritten: a hit
    assert again.info.get("from_cache") is True


def test_a_read_only_feature_cache_is_refused_before_pre_training(tmp_path, monkeypatch, capsys):
    """Issue 32.12: a read-only ``--feature-cache`` was found only after pre-training. (The
    tests run as root, whom permission bits do not stop: the cache's write test is made to
    fail the way a read-only directory fails it.)"""
    ro = tmp_path / "ro-cache"
    ro.mkdir()
    real = fc.tempfile.TemporaryFile

    def denied(*args, dir=None, **kwargs):
        if Path(dir) == ro:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fc.tempfile, "TemporaryFile", denied)
    monkeypatch.setattr(lt, "pretrain_image_tower", _trap)
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--locked-image", "pretrained",
            "--feature-cache", str(ro)]  # fmt: skip
    try:
        code = train.main(argv)
    except _Trap:
        pytest.fail("pre-training started with a read-only --feature-cache")
    line = _one_line_error(code, capsys.readouterr().err)
    assert f"--feature-cache {ro} cannot be written" in line
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ a user's feature files


def _savez(path: Path) -> None:
    with path.open("wb") as f:  # np.savez on a file object keeps the name train.npy
        np.savez(f, a=np.zeros((64, 8), np.float32))


def _train_with(tmp_path, feats: str, capsys, *extra: str) -> tuple[int, str]:
    code = train.main(["--workdir", str(tmp_path / "w"), *LOCKED, "--locked-image", feats, *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b""), "train.npy is empty (0 bytes)"),
        (_savez, "train.npy is an .npz archive (np.savez), not an .npy array"),
    ],
    ids=["0 bytes", "npz"],
)  # fmt: skip
def test_a_feature_file_that_is_no_npy_array_is_one_line(tmp_path, capsys, write, message):
    """Issue 32.12: a 0-byte ``train.npy`` raised ``EOFError``; an ``.npz`` saved under that
    name ``AttributeError``."""
    feats = _features(tmp_path / "f")
    write(Path(feats) / "train.npy")
    line = _one_line_error(*_train_with(tmp_path, feats, capsys))
    assert message in line, line
    assert not (tmp_path / "w").exists()


def test_train_and_test_features_of_two_widths_are_refused_before_training(
    tmp_path, capsys, monkeypatch
):
    """Issue 32.10: they failed only after training, in the final evaluation."""
    feats = _features(tmp_path / "f", train_width=8, test_width=6)
    line = _one_line_error(*_train_with(tmp_path, feats, capsys))
    assert "train.npy has 8 columns but test.npy has 6" in line, line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_locked_features_of_any_finite_size_normalise_to_unit_rows(scale):
    """Issue 32.7: rows near 1e30 overflowed the squared norm and every embedding became 0
    (and rows near 1e-30 stayed unnormalised)."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 16)).astype(np.float32)
    x = jnp.asarray(rows * np.float32(scale))
    got = np.asarray(lt.LockedFeatures(16)(x))
    want = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Ordinary rows give the plain formula's bits, and an all-zero row stays 0.
    plain = rows * (1 / np.sqrt(np.sum(rows * rows, axis=1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(lt.LockedFeatures(16)(jnp.asarray(rows))), plain,
                               rtol=1e-6)  # fmt: skip
    assert np.all(np.asarray(lt.LockedFeatures(16)(jnp.zeros((2, 16)))) == 0)


# ------------------------------------------------------------------ the data set


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tfds")
    prepare_digits(d)
    return str(d)


def test_a_bit_flipped_digits_file_is_one_line_naming_it_exit_2(digits_dir, tmp_path, capsys):
    """Issue 32.16: one flipped byte mid-file gave one line without the file's name, exit 1,
    once training read that record; the README promises the name and exit 2, before
    training."""
    data = tmp_path / "tfds"
    shutil.copytree(digits_dir, data)
    (f,) = glob.glob(str(data / "sklearn_digits" / "*" / "sklearn_digits-train.array_record*"))
    _flip(Path(f))
    fast = ["--model", "mlp", "--width", "8", "--batch-size", "32", "--steps", "4",
            "--eval-examples", "64", "--no-progress", "--num-devices", "2"]  # fmt: skip
    code = train.main(["--workdir", str(tmp_path / "w"), "--data-dir", str(data), *fast])
    line = _one_line_error(code, capsys.readouterr().err)
    assert f"data file {f} cannot be read" in line, line
    assert not (tmp_path / "w").exists()


def test_a_data_set_not_prepared_leaves_no_work_dir(tmp_path, capsys):
    """Issue 32.13: a missing TFDS data set left an empty work dir behind."""
    empty = tmp_path / "empty"
    code = train.main(["--workdir", str(tmp_path / "w"), "--dataset", "cifar10",
                       "--data-dir", str(empty), "--no-progress"])  # fmt: skip
    line = _one_line_error(code, capsys.readouterr().err)
    assert "is not prepared in" in line
    assert not (tmp_path / "w").exists() and not empty.exists()


# ------------------------------------------------------------------ settings that mislead


def test_a_temperature_the_ceiling_would_clip_is_refused(tmp_path, capsys):
    """Issue 32.8: ``--no-learn-temperature --temperature 0.01 --max-inverse-temperature 10``
    trained at 0.1 without a word."""
    code = train.main(["--workdir", str(tmp_path / "w"), "--no-learn-temperature",
                       "--temperature", "0.01", "--max-inverse-temperature", "10"])  # fmt: skip
    line = _one_line_error(code, capsys.readouterr().err)
    assert "--temperature 0.01 is below 1/--max-inverse-temperature = 0.1" in line, line
    assert "at least 100" in line
    code = train.main(["--workdir", str(tmp_path / "w"), "--max-inverse-temperature", "10"])
    line = _one_line_error(code, capsys.readouterr().err)
    assert "the infonce loss's default temperature 0.07" in line, line
    assert not (tmp_path / "w").exists()


def test_an_eval_growth_next_to_1_is_refused_at_once(tmp_path, capsys):
    """Issue 32.9: ``--eval-growth 1.0000000000000002`` hung before step 1."""
    t0 = time.monotonic()
    code = train.main(["--workdir", str(tmp_path / "w"), "--eval-growth", "1.0000000000000002"])
    line = _one_line_error(code, capsys.readouterr().err)
    assert time.monotonic() - t0 < 10
    assert line.startswith("error: --eval-growth must be above 1 by at least 0.0001"), line
    with pytest.raises(ValueError, match="growth must be 0 or at least 1.0001"):
        loop.geometric_steps(1.0 + 1e-12, 100)
    assert sorted(loop.geometric_steps(1.0001, 3)) == [1, 2, 3]


def test_first_hard_step_is_where_the_first_clustering_takes_effect():
    for n, b, every in [(256, 64, 4), (1000, 64, 30), (2048, 64, 1024), (96, 32, 3)]:
        order = HardBatchOrder(n, b, 1, seed=0, refresh_every=every)
        first = next(s + 1 for s in range(10_000) if order.is_refresh_step(s))
        assert first_hard_step(n, b, every) == first


def test_hard_batches_that_would_never_come_are_refused(tmp_path, capsys):
    """Issue 32.6: ``train --hard-batches`` shorter than an epoch said nothing, and every
    batch of the "hard" run was random."""
    feats = _features(tmp_path / "f")
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--locked-image", feats,
            "--hard-batches", "--cluster-size", "4", "--refresh-every", "4"]  # fmt: skip
    code = train.main(argv)  # 64 / 16 = 4 steps an epoch: the first hard batch is step 5
    line = _one_line_error(code, capsys.readouterr().err)
    assert "--hard-batches: the first hard batch is step 5" in line and "--steps is 3" in line
    assert not (tmp_path / "w").exists()
