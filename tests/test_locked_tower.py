"""Locked image towers: pre-training, the feature and parameter caches, user feature files,
a dual encoder on locked features (LiT / SigLiT) and its bag-of-words text tower."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import contrastive.data.feature_cache as fc
import contrastive.models.locked_tower as lt
from contrastive.data.captioned_shapes import TEXT_LEN, VOCAB_SIZE, CaptionedShapes
from contrastive.mesh import make_mesh, shard_batch
from contrastive.models import SIGLIP_INIT_BIAS, SIGLIP_INIT_TEMPERATURE, DualEncoder
from contrastive.step.optim import make_optimizer
from contrastive.step.train_step import create_train_state, make_train_step, place_state
from contrastive.step_configs import LossConfig, OptimConfig, TrainConfig

# A few seconds (mostly compilation): enough to run every code path.
FAST = lt.PretrainConfig(width=32, train_examples=256, test_examples=64, steps=20, batch_size=32)


@pytest.fixture(scope="module")
def fast_tower() -> lt.PretrainedTower:
    return lt.pretrain_image_tower(FAST)


# ------------------------------------------------------------------ pre-training


def test_pretraining_is_deterministic(fast_tower):
    again = lt.pretrain_image_tower(FAST)
    assert again.info["params_sha256"] == fast_tower.info["params_sha256"]
    assert again.info["accuracy"] == fast_tower.info["accuracy"]
    assert lt.params_digest(nnx.state(again.tower)) == fast_tower.info["params_sha256"]
    other = lt.params_digest(nnx.state(lt.build_image_tower(dataclasses.replace(FAST, seed=1))))
    assert other != lt.params_digest(nnx.state(lt.build_image_tower(FAST)))


def test_pretraining_beats_chance_on_every_attribute():
    cfg = lt.PretrainConfig(train_examples=2048, test_examples=1000, steps=500)
    info = lt.pretrain_image_tower(cfg).info
    n = info["test_examples"]
    assert info["loss_end"] < info["loss_start"]
    for name, acc in info["accuracy"].items():
        # The test labels of every attribute are uniform, so a classifier that ignores the
        # image is right with probability p = chance whatever it predicts: its accuracy
        # over n examples has standard deviation sqrt(p (1 - p) / n). Five of those above
        # chance happens by luck with probability < 3e-7 (one-sided normal tail).
        p = info["chance"][name]
        assert acc > p + 5 * math.sqrt(p * (1 - p) / n), (name, acc, p)


def test_pretrain_config_rejects_bad_values():
    with pytest.raises(ValueError, match="encoder"):
        lt.PretrainConfig(encoder="cnn")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        lt.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        lt.PretrainConfig(learning_rate=0.0)


def test_pretrained_parameters_are_cached_by_config(fast_tower, tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(config):  # the cache logic under test, not pre-training again
        calls.append(config)
        return lt.PretrainedTower(fast_tower.tower, config, dict(fast_tower.info))

    monkeypatch.setattr(lt, "pretrain_image_tower", fake_pretrain)
    first = lt.pretrained_image_tower(FAST, cache_dir=tmp_path)
    second = lt.pretrained_image_tower(FAST, cache_dir=tmp_path)
    assert len(calls) == 1 and not first.info["from_cache"] and second.info["from_cache"]
    # A rebuilt tower with the loaded values: bitwise the pre-trained parameters.
    assert second.tower is not fast_tower.tower
    assert lt.params_digest(nnx.state(second.tower)) == fast_tower.info["params_sha256"]
    assert second.info["accuracy"] == fast_tower.info["accuracy"]
    lt.pretrained_image_tower(dataclasses.replace(FAST, steps=21), cache_dir=tmp_path)
    assert len(calls) == 2
    # A damaged parameter file is not trusted: pre-train again, and repair the entry.
    for path in tmp_path.glob("tower-*.npz"):
        path.write_bytes(b"not an npz")
    lt.pretrained_image_tower(FAST, cache_dir=tmp_path)
    assert len(calls) == 3
    assert lt.pretrained_image_tower(FAST, cache_dir=tmp_path).info["from_cache"]
    assert len(calls) == 3


# ------------------------------------------------------------------ features


def test_image_features_are_the_tower_on_the_images_in_order(fast_tower):
    n = 37
    feats = lt.image_features(fast_tower.tower, split="test", num_examples=n, batch_size=16)
    assert feats.shape == (n, fast_tower.features) and feats.dtype == np.float32
    src = CaptionedShapes("test", num_examples=n)
    images = np.stack([src[i]["image"] for i in range(n)]).astype(np.float32) / 255.0
    direct = np.asarray(fast_tower.tower(jnp.asarray(images)))
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)


def _counting(array):
    calls = []

    def compute():
        calls.append(1)
        return array

    return compute, calls


def test_feature_cache_hits_on_same_config_and_params_and_misses_otherwise(tmp_path):
    feats = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    config = {"kind": "test", "width": 3}
    compute, calls = _counting(feats)

    def get(cfg=config, p=params, split="train", n=10, seed=0):
        return lt.cached_features(tmp_path, cfg, p, split, n, compute, data_seed=seed)

    np.testing.assert_array_equal(get(), feats)
    assert len(calls) == 1
    for _ in range(2):  # hits: no recomputation, the stored values
        np.testing.assert_array_equal(get(), feats)
    assert len(calls) == 1
    # The same values in a fresh pytree (e.g. loaded from a checkpoint): still a hit.
    get(p={"w": params["w"].copy(), "b": np.zeros(3, np.float32)})
    assert len(calls) == 1
    # One bit of one parameter differs: a miss.
    w = params["w"].copy()
    w.view(np.uint32)[0, 0] ^= 1
    get(p={"w": w, "b": params["b"]})
    assert len(calls) == 2
    get(cfg={"kind": "test", "width": 4})
    assert len(calls) == 3
    get(split="test")
    get(seed=1)
    compute_small, small_calls = _counting(feats[:9])
    lt.cached_features(tmp_path, config, params, "train", 9, compute_small)
    assert len(calls) == 5 and len(small_calls) == 1
    get()  # the first entry is still there
    assert len(calls) == 5


def test_feature_cache_write_is_atomic(tmp_path, monkeypatch):
    feats = np.ones((8, 3), np.float32)
    compute, calls = _counting(feats)
    args = (tmp_path, {"k": 1}, {"w": np.ones(2, np.float32)}, "train", 8, compute)

    # A crash after the data reached the temporary file, before it was renamed.
    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(lt.os, "fsync", crash)
    # One line naming the entry (a full or read-only cache is bad input, not a traceback).
    with pytest.raises(fc.CacheWriteError, match="simulated"):
        lt.cached_features(*args)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no partial entry, no temporary file

    # A crash between the data file and its JSON: the data is not trusted without it.
    real = fc._atomic_write
    state = {"n": 0}

    def second_write_fails(path, data):
        state["n"] += 1
        if state["n"] == 2:
            raise OSError("killed (simulated)")
        real(path, data)

    monkeypatch.setattr(fc, "_atomic_write", second_write_fails)
    with pytest.raises(fc.CacheWriteError, match="killed"):
        lt.cached_features(*args)
    monkeypatch.undo()
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]
    np.testing.assert_array_equal(lt.cached_features(*args), feats)
    assert len(calls) == 3  # recomputed: an entry without its JSON was a miss

    # A stray temporary file and a damaged .npy behind a valid JSON: ignored, recomputed.
    (tmp_path / ".features-train-8-x.npy.123.tmp").write_bytes(b"\x93NUMPY partial")
    (npy,) = tmp_path.glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:40])
    np.testing.assert_array_equal(lt.cached_features(*args), feats)
    assert len(calls) == 4
    np.testing.assert_array_equal(lt.cached_features(*args), feats)
    assert len(calls) == 4


def test_feature_cache_rejects_bad_computed_features(tmp_path):
    params = {"w": np.ones(2, np.float32)}
    for bad, match in [
        (np.ones((7, 3), np.float32), r"shape \(7, 3\); expected \[8, F\]"),
        (np.ones((8, 3), np.int32), "dtype int32"),
        (np.full((8, 3), np.nan, np.float32), "non-finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            lt.cached_features(tmp_path, {}, params, "train", 8, lambda b=bad: b)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        lt.cached_features(tmp_path, {"f": object()}, params, "train", 8, lambda: None)
    assert list(tmp_path.iterdir()) == []


def test_tower_features_go_through_the_cache(fast_tower, tmp_path, monkeypatch):
    first = lt.tower_features(fast_tower, split="train", num_examples=20, cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(lt, "image_features", lambda *a, **k: calls.append(1))
    again = lt.tower_features(fast_tower, split="train", num_examples=20, cache_dir=tmp_path)
    assert calls == []
    np.testing.assert_array_equal(again, first)


def test_shapes_captions_match_the_source():
    tokens, ids = lt.shapes_captions("train", 25, data_seed=3)
    src = CaptionedShapes("train", num_examples=25, seed=3)
    assert tokens.shape == (25, TEXT_LEN) and tokens.dtype == np.int32
    for i in range(25):
        np.testing.assert_array_equal(tokens[i], src[i]["text"])
        assert ids[i] == src[i]["caption_id"]


# ------------------------------------------------------------------ user feature files


def _save(tmp_path, array, name="features.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    ("array", "name", "message"),
    [
        (None, "missing.npy", "does not exist"),
        (np.ones((1000, 4), np.float32), "features.txt", "not a .npy file"),
        (np.ones((1000,), np.float32), "features.npy", r"shape \(1000,\); .* 2-D"),
        (np.ones((10, 100, 4), np.float32), "features.npy", "2-D"),
        (np.ones((1000, 4), np.int64), "features.npy", "holds int64 values"),
        (np.ones((1000, 4), bool), "features.npy", "holds bool values"),
        (
            np.ones((999, 4), np.float32),
            "features.npy",
            "features.npy has 999 rows but the training split has 1000 examples: ",
        ),
        (np.ones((1000, 0), np.float32), "features.npy", "D >= 1"),
        (
            np.where(np.arange(4000).reshape(1000, 4) == 2001, np.inf, 1.0).astype(np.float32),
            "features.npy",
            r"1 non-finite values \(NaN/inf; first in row 500\)",
        ),
        (np.full((1000, 4), 1e300), "features.npy", "beyond float32's range"),
    ],
)
def test_load_feature_file_errors_are_one_line(tmp_path, array, name, message):
    path = tmp_path / name
    if array is not None:
        with open(path, "wb") as f:
            np.save(f, array)
    with pytest.raises(ValueError, match=message) as err:
        lt.load_feature_file(path, num_examples=1000, split_name="training")
    assert "\n" not in str(err.value)


def test_load_feature_file_refuses_garbage(tmp_path):
    path = tmp_path / "features.npy"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a readable .npy array"):
        lt.load_feature_file(path, num_examples=3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_load_feature_file_converts_floats_to_float32(tmp_path, dtype):
    values = np.random.default_rng(0).normal(size=(12, 5)).astype(dtype)
    out = lt.load_feature_file(_save(tmp_path, values), num_examples=12)
    assert out.dtype == np.float32 and out.shape == (12, 5)
    # Widening (float16, bfloat16) is exact; float64 is rounded to nearest float32.
    np.testing.assert_array_equal(out, values.astype(np.float64).astype(np.float32))


# ------------------------------------------------------------------ the locked model


def test_locked_features_pass_through_or_normalise():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)), jnp.float32)
    np.testing.assert_array_equal(lt.LockedFeatures(7, normalize=False)(x), x)
    y = lt.LockedFeatures(7)(x)
    np.testing.assert_allclose(y, x / jnp.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    assert nnx.state(lt.LockedFeatures(7), nnx.Param) == nnx.State({})
    with pytest.raises(ValueError, match=r"takes feature rows \[B, 7\], got shape \(5, 32, 32"):
        lt.LockedFeatures(7)(jnp.zeros((5, 32, 32, 3)))


def test_bag_of_words_ignores_padding_and_order_and_replays_dropout():
    text = lt.BagOfWordsText(VOCAB_SIZE, TEXT_LEN, width=16, dropout_rate=0.5, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(text)
    run = jax.jit(lambda tokens, key=None: nnx.merge(graphdef, params)(tokens, key))
    tokens, _ = lt.shapes_captions("train", 6)
    out = run(tokens)
    assert out.shape == (6, 16) and text.features == 16
    # Word order and trailing padding change nothing (a bag of words); a word does.
    rng = np.random.default_rng(0)
    shuffled = np.array([np.concatenate([rng.permutation(t[t > 0]), t[t == 0]]) for t in tokens])
    assert not np.array_equal(shuffled, tokens)
    np.testing.assert_allclose(run(shuffled), out, rtol=1e-5, atol=1e-6)
    assert np.all(tokens[:, 13:] == 0)  # the longest caption has 13 tokens
    np.testing.assert_allclose(run(tokens[:, :13]), out, rtol=1e-5, atol=1e-6)
    other = tokens.copy()
    other[:, 1] = 5
    assert not np.allclose(run(other)[0], out[0])
    key = jax.random.key(1)
    dropped = run(tokens, key)
    assert not np.allclose(dropped, out)
    np.testing.assert_array_equal(run(tokens, key), dropped)
    with pytest.raises(ValueError, match="max_len=16"):
        text(jnp.zeros((2, 17), jnp.int32))


def _locked_batch(n: int, features: int):
    tokens, ids = lt.shapes_captions("train", n)
    # Features that carry the caption: a fixed random code of each caption id plus noise,
    # so that the text tower has something to match.
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(5184, features)).astype(np.float32)
    feats = codes[ids] + 0.1 * rng.normal(size=(n, features)).astype(np.float32)
    return feats, tokens


@pytest.mark.parametrize(("loss", "devices"), [("sigmoid", 2), ("infonce", 1)])
def test_locked_model_trains_with_the_train_step(loss, devices):
    """SigLiT / LiT through the library's sharded step: the loss falls over 20 steps."""
    f, b = 32, 32
    siglip = loss == "sigmoid"
    model = DualEncoder(
        lt.LockedFeatures(f),
        lt.BagOfWordsText(VOCAB_SIZE, TEXT_LEN, width=32, rngs=nnx.Rngs(1)),
        embed_dim=16,
        init_temperature=SIGLIP_INIT_TEMPERATURE if siglip else 0.07,
        init_bias=SIGLIP_INIT_BIAS if siglip else None,
        rngs=nnx.Rngs(0),
    )
    cfg = TrainConfig(
        loss=LossConfig(loss),
        optim=OptimConfig("adamw", learning_rate=1e-2, total_steps=20, warmup_steps=0),
    )
    mesh = make_mesh(num_devices=devices)
    graphdef, state = create_train_state(model, make_optimizer(cfg.optim))
    state = place_state(state, mesh)
    step = make_train_step(graphdef, cfg, mesh)
    feats, tokens = _locked_batch(b, f)
    batch = shard_batch((feats, tokens), mesh)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
