"""Evaluation: linear probe, k-NN, zero-shot and retrieval recall on constructed embeddings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.measure.evaluate import (
    embed,
    knn_accuracy,
    linear_probe,
    retrieval_recall,
    zero_shot_accuracy,
)


def _blobs(n, d, c, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * sep
    y = rng.integers(c, size=n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_linear_probe_separable_and_chance():
    x, y = _blobs(600, 16, 5, sep=4.0, seed=0)
    assert linear_probe(x[:400], y[:400], x[400:], y[400:]) > 0.97
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(600, 16))
    acc = linear_probe(noise[:400], y[:400], noise[400:], y[400:])
    assert acc < 0.4  # chance is 0.2


def test_knn_accuracy():
    x, y = _blobs(500, 8, 4, sep=5.0, seed=2)
    assert knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=10) > 0.95
    # k=1 on the training set itself is exact recall of each point's label.
    assert knn_accuracy(x, y, x, y, k=1) == 1.0
    with pytest.raises(ValueError, match="labels must be"):
        knn_accuracy(x, y[:-1], x, y)


def test_retrieval_recall_exact_values():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(50, 12))
    r = retrieval_recall(img, img, ks=(1, 5))
    assert r == {"i2t_r@1": 1.0, "t2i_r@1": 1.0, "i2t_r@5": 1.0, "t2i_r@5": 1.0}
    # Text i matches image (i+1) % N: the true pair is never the nearest.
    shifted = retrieval_recall(img, np.roll(img, 1, axis=0), ks=(1, 50))
    assert shifted["i2t_r@1"] == 0.0 and shifted["t2i_r@1"] == 0.0
    assert shifted["i2t_r@50"] == 1.0
    # A hand-made 3x3 case: image i is e_i; text 1 leans towards image 0.
    a = np.eye(3)
    b = np.array([[0.8, 0.0, 0.6], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval_recall(a, b, ks=(1, 2))
    assert r["i2t_r@1"] == pytest.approx(2 / 3)  # image 0 prefers text 1 to text 0
    assert r["t2i_r@1"] == pytest.approx(2 / 3)  # text 1 prefers image 0 to image 1
    assert r["i2t_r@2"] == 1.0 and r["t2i_r@2"] == 1.0


def test_embed_batches_and_pads():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    out = embed(lambda b: jnp.sum(b, axis=1, keepdims=True) * 2, x, batch_size=4)
    np.testing.assert_allclose(out[:, 0], x.sum(1) * 2)


def test_zero_shot_accuracy_hand_made():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])  # 4 captions in 2-D
    images = np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2], [0.7, 0.7], [0.0, 1.0]])
    # Nearest captions: 0, 1, 2, 3 (cos 0.99 against 0.71 for captions 0 and 1), 1.
    labels = np.array([0, 1, 2, 3, 3])
    assert zero_shot_accuracy(images, classes, labels) == pytest.approx(4 / 5)
    # Image 4 (= caption 1) ranks caption 3 second (cos 0.8 vs caption 0's 0).
    assert zero_shot_accuracy(images, classes, labels, k=2) == 1.0
    # Chunking changes nothing; a tie between the true caption and another is not a miss.
    assert zero_shot_accuracy(images, classes, labels, chunk=2) == pytest.approx(4 / 5)
    assert zero_shot_accuracy(np.ones((1, 2)), np.ones((2, 2)), np.array([1])) == 1.0
    with pytest.raises(ValueError, match="labels must be integer rows of class_emb"):
        zero_shot_accuracy(images, classes, labels + 1)
    with pytest.raises(ValueError, match="one width D"):
        zero_shot_accuracy(images, classes[:, :1], labels)


def test_retrieval_recall_counts_duplicate_captions_as_matches():
    # Images 0 and 1 show the same caption (id 7), so texts 0 and 1 are interchangeable.
    img = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = np.array([[0.1, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    plain = retrieval_recall(img, txt, ks=(1, 2))
    assert plain["i2t_r@1"] == pytest.approx(1 / 3) and plain["t2i_r@1"] == pytest.approx(1 / 3)
    dup = retrieval_recall(img, txt, ks=(1, 2), ids=np.array([7, 7, 3]))
    assert dup == {"i2t_r@1": 1.0, "t2i_r@1": 1.0, "i2t_r@2": 1.0, "t2i_r@2": 1.0}
    # A non-matching candidate ahead of every match still counts against the query.
    txt2 = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    r = retrieval_recall(img, txt2, ks=(1, 2, 3), ids=np.array([7, 7, 3]))
    # Image 0: text 2 (1) > its matches (0): rank 1. Image 1: all 0, ties: rank 0.
    # Image 2: texts 0, 1 (1) > its match text 2 (0): rank 2.
    assert [r[f"i2t_r@{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # ids all distinct is the usual recall.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    assert retrieval_recall(a, b, ks=(1, 5), ids=np.arange(40) * 3) == retrieval_recall(
        a, b, ks=(1, 5)
    )
    with pytest.raises(ValueError, match="ids must be"):
        retrieval_recall(a, b, ids=np.arange(39))
