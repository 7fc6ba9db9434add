"""Data: offline digits builder, generated shapes, grain pipelines (determinism, host
sharding), mocked TFDS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive.data import (
    AugmentConfig,
    BatchIterator,
    CaptionedShapes,
    HashTokenizer,
    class_captions,
    eval_arrays,
    get_spec,
    load_source,
    prepare_digits,
    simclr_view,
    train_dataset,
)
from contrastive.data.captioned_shapes import caption_attributes, decode


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare_digits(d)
    return d


def test_digits_builder_writes_array_record(data_dir):
    files = sorted(p.name for p in (data_dir / "sklearn_digits" / "1.0.0").iterdir())
    assert any(".array_record" in f and "train" in f for f in files), files
    assert any(".array_record" in f and "test" in f for f in files), files
    # The TFDS reader reads it back: tfds.data_source on the registered builder.
    src = tfds.data_source("sklearn_digits", split="train", data_dir=str(data_dir))
    assert len(src) == 1438
    assert len(tfds.data_source("sklearn_digits", split="test", data_dir=str(data_dir))) == 359
    ex = src[0]
    assert ex["image"].shape == (16, 16, 1) and ex["image"].dtype == np.uint8
    assert 0 <= int(ex["label"]) < 10


def test_digits_splits_are_disjoint_and_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    train = eval_arrays("digits", "train", data_dir=data_dir)
    test = eval_arrays("digits", "test", data_dir=data_dir)
    assert train["image"].shape == (1438, 16, 16, 1) and test["image"].shape == (359, 16, 16, 1)
    assert np.bincount(np.concatenate([train["label"], test["label"]]), minlength=10).tolist() == (
        np.bincount(load_digits().target, minlength=10).tolist()
    )
    # No image of the test split appears in the training split.
    tr = {im.tobytes() for im in train["image"]}
    assert sum(im.tobytes() in tr for im in test["image"]) < 5  # sklearn has a few duplicates
    assert train["image"].min() >= 0.0 and train["image"].max() <= 1.0


def test_prepare_twice_reuses_files(data_dir):
    info = json.loads((data_dir / "sklearn_digits" / "1.0.0" / "dataset_info.json").read_text())
    prepare_digits(data_dir)  # no error, no rewrite
    again = json.loads((data_dir / "sklearn_digits" / "1.0.0" / "dataset_info.json").read_text())
    assert info == again and info["fileFormat"] == "array_record"


def test_train_batches_shapes_and_determinism(data_dir):
    ds = train_dataset("digits", global_batch_size=32, seed=7, data_dir=data_dir)
    b = ds[3]
    assert b["view1"].shape == (32, 16, 16, 1) and b["view1"].dtype == np.float32
    assert b["view2"].shape == (32, 16, 16, 1) and b["label"].shape == (32,)
    assert not np.allclose(b["view1"], b["view2"])  # two different views
    again = train_dataset("digits", global_batch_size=32, seed=7, data_dir=data_dir)[3]
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    other = train_dataset("digits", global_batch_size=32, seed=8, data_dir=data_dir)[3]
    assert not np.array_equal(b["view1"], other["view1"])


def test_epochs_are_reshuffled_and_cover_the_data(data_dir):
    src = load_source("digits", "train", data_dir)
    ds = train_dataset("digits", global_batch_size=2, seed=0, source=_IndexSource(src))
    n = len(src)
    first = np.concatenate([ds[s]["label"] for s in range(n // 2)])
    second = np.concatenate([ds[s]["label"] for s in range(n // 2, n)])
    assert sorted(first.tolist()) == sorted(range(n))  # an epoch is a permutation
    assert sorted(second.tolist()) == sorted(range(n))
    assert first.tolist() != second.tolist()


class _IndexSource:
    """A source whose labels are the example indices, to follow examples through the pipeline."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return {"image": self.src[i]["image"], "label": i}


def test_hosts_build_their_rows_of_one_global_batch(data_dir):
    """Two hosts build disjoint halves of the very batch (examples and augmentations) one
    host builds alone: a run's data does not depend on its number of processes."""
    src = _IndexSource(load_source("digits", "train", data_dir))
    one = train_dataset("digits", global_batch_size=16, seed=0, source=src)
    hosts = [
        train_dataset(
            "digits", global_batch_size=16, seed=0, source=src, process_index=h, process_count=2
        )
        for h in range(2)
    ]
    for step in (0, 7, 95):  # 95: past the first epoch of 1438 examples
        parts = [ds[step] for ds in hosts]
        assert parts[0]["view1"].shape[0] == 8  # per-host batch
        assert not set(parts[0]["label"].tolist()) & set(parts[1]["label"].tolist())
        for k in ("view1", "view2", "label"):
            np.testing.assert_array_equal(
                np.concatenate([p[k] for p in parts]), one[step][k], err_msg=k
            )
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        train_dataset("digits", global_batch_size=16, seed=0, source=src, process_count=3)


def test_batch_iterator_state_resumes(data_dir):
    ds = train_dataset("digits", global_batch_size=8, seed=1, data_dir=data_dir)
    it = BatchIterator(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = next(it)
    it2 = BatchIterator(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["view1"], expected["view1"])


def test_simclr_view_properties():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(32, 32, 3)).astype(np.float32)
    cfg = AugmentConfig(image_size=24)
    v = simclr_view(image, np.random.default_rng(1), cfg)
    assert v.shape == (24, 24, 3) and v.dtype == np.float32
    assert v.min() >= 0.0 and v.max() <= 1.0
    np.testing.assert_array_equal(v, simclr_view(image, np.random.default_rng(1), cfg))
    # Without augmentation strength, a full-image "crop" is the identity resize.
    plain = AugmentConfig(
        image_size=32,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip=False,
        jitter_prob=0.0,
        grayscale_prob=0.0,
    )
    np.testing.assert_allclose(simclr_view(image, rng, plain), image, atol=1e-6)


def test_hash_tokenizer():
    tok = HashTokenizer(vocab_size=100, max_len=6)
    a = tok("A dog, running!")
    assert a.dtype == np.int32 and a.shape == (6,)
    assert a[0] == 1 and a[4] == 2 and a[5] == 0  # BOS dog... EOS PAD
    np.testing.assert_array_equal(a, tok(b"a DOG running"))
    assert (tok("w " * 50) > 0).all()  # truncated, still ends with EOS
    assert tok("w " * 50)[-1] == 2
    with pytest.raises(ValueError):
        HashTokenizer(vocab_size=2)


@pytest.mark.parametrize(
    ("name", "size", "channels"), [("cifar10", 32, 3), ("cifar100", 32, 3), ("stl10", 64, 3)]
)
def test_mocked_image_datasets(name, size, channels):
    with tfds.testing.mock_data(num_examples=24):
        ds = train_dataset(name, global_batch_size=8, seed=0)
        b = ds[0]
        assert b["view1"].shape == (8, size, size, channels)
        assert b["view2"].shape == (8, size, size, channels)
        assert b["label"].shape == (8,) and b["label"].max() < get_spec(name).num_classes
        ev = eval_arrays(name, "test", max_examples=10)
        assert ev["image"].shape == (10, size, size, channels) and ev["label"].shape == (10,)


def _coco_metadata(root):
    """The metadata files of prepared coco_captions/2014, written without TensorFlow.

    TFDS's coco_captions builder code needs TensorFlow to describe its features, but a
    prepared dataset is read from its metadata files; this writes the same features.
    """
    feats = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
        }
    )
    d = root / "coco_captions" / "2014" / "1.1.0"
    d.mkdir(parents=True)
    feats.save_config(str(d))
    split = {
        "numBytes": "1",
        "shardLengths": ["16"],
        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
    }
    info = {
        "name": "coco_captions",
        "configName": "2014",
        "version": "1.1.0",
        "fileFormat": "array_record",
        "splits": [dict(split, name="train"), dict(split, name="val")],
    }
    (d / "dataset_info.json").write_text(json.dumps(info))


def test_mocked_coco_captions(tmp_path):
    _coco_metadata(tmp_path)
    with tfds.testing.mock_data(
        num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
    ):
        ds = train_dataset("coco_captions", global_batch_size=4, seed=0, image_size=24)
        b = ds[1]
        assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
        assert b["text"].shape == (4, 32) and b["text"].dtype == np.int32
        assert (b["text"][:, 0] == 1).all()
        np.testing.assert_array_equal(
            b["text"],
            train_dataset("coco_captions", global_batch_size=4, seed=0, image_size=24)[1]["text"],
        )
        ev = eval_arrays("coco_captions", "val", image_size=24, max_examples=6)
        assert ev["image"].shape == (6, 24, 24, 3) and ev["text"].shape == (6, 32)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not prepared in .*--dataset digits"):
        load_source("cifar10", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        get_spec("mnist")
    with pytest.raises(ValueError, match="lower --batch-size"):
        train_dataset("digits", global_batch_size=4096, seed=0, data_dir=tmp_path)


def test_shapes_spec_and_batches():
    spec = get_spec("shapes")
    assert spec.kind == "image_text" and spec.class_captions
    assert (spec.vocab_size, spec.text_len, spec.image_size) == (36, 16, 32)
    ds = train_dataset("shapes", global_batch_size=16, seed=0, tokenizer=HashTokenizer(99, 5))
    b = ds[2]
    assert b.keys() == {"image", "text", "caption_id"}
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == (16, 16) and b["text"].dtype == np.int32  # its own tokens
    assert b["caption_id"].shape == (16,) and b["caption_id"].dtype == np.int32
    assert b["image"].min() >= 0.0 and b["image"].max() <= 1.0
    assert (b["text"] < spec.vocab_size).all() and (b["text"][:, 0] == 1).all()
    for text, cid in zip(b["text"], b["caption_id"], strict=True):
        assert decode(text) == {k: int(v) for k, v in caption_attributes(cid).items()}
    again = train_dataset("shapes", global_batch_size=16, seed=0)[2]
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    assert not np.array_equal(
        train_dataset("shapes", global_batch_size=16, seed=1)[2]["image"], b["image"]
    )
    big = train_dataset("shapes", global_batch_size=4, seed=0, image_size=48)[0]
    assert big["image"].shape == (4, 48, 48, 3)


class _ShapesIndexSource:
    """Captioned shapes whose ``caption_id`` is the example index, to follow examples."""

    def __init__(self, n):
        self.src = CaptionedShapes("train", num_examples=n)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return dict(self.src[i], caption_id=np.int32(i))


def test_shapes_hosts_build_their_rows_without_augmentation():
    src = _ShapesIndexSource(200)
    one = train_dataset("shapes", global_batch_size=16, seed=0, source=src)
    hosts = [
        train_dataset(
            "shapes", global_batch_size=16, seed=0, source=src, process_index=h, process_count=2
        )
        for h in range(2)
    ]
    for step in range(12):
        parts = [ds[step] for ds in hosts]
        assert parts[0]["image"].shape[0] == 8  # per-host batch
        ids = [p["caption_id"].tolist() for p in parts]
        assert not set(ids[0]) & set(ids[1])
        np.testing.assert_array_equal(ids[0] + ids[1], one[step]["caption_id"])
        for image, i in zip(parts[0]["image"], ids[0], strict=True):  # the source's pixels
            np.testing.assert_array_equal(image, src[int(i)]["image"].astype(np.float32) / 255.0)


def test_shapes_eval_arrays_and_class_captions():
    ev = eval_arrays("shapes", "test", max_examples=12, tokenizer=HashTokenizer(99, 5))
    assert ev.keys() == {"image", "text", "caption_id", "novel"}
    assert ev["image"].shape == (12, 32, 32, 3) and ev["image"].dtype == np.float32
    assert ev["text"].shape == (12, 16) and ev["caption_id"].dtype == np.int32
    assert ev["novel"].tolist() == [False, True] * 6
    src = load_source("shapes", "test")
    np.testing.assert_array_equal(ev["text"][5], src[5]["text"])
    tokens, ids = class_captions("shapes")
    assert tokens.shape == (5184, 16) and ids.shape == (5184,)
    np.testing.assert_array_equal(tokens[ev["caption_id"]][:, 0], 1)
    for cid in ev["caption_id"]:
        assert decode(tokens[cid]) == decode(ev["text"][list(ev["caption_id"]).index(cid)])
    with pytest.raises(ValueError, match="'digits' has no class captions"):
        class_captions("digits")
    with pytest.raises(ValueError, match="split must be one of train, test"):
        load_source("shapes", "validation")
