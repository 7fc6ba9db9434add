"""Captioned shapes: determinism, disjoint splits, held-out pairs, captions that say what the
image shows, and the exact expected count of one-attribute-apart negatives vs Monte-Carlo."""

from __future__ import annotations

import numpy as np
import pytest

import contrastive.data.captioned_shapes as cs
import contrastive.data.shape_rendering as rendering
from contrastive.data import train_dataset
from contrastive.data.captioned_shapes import (
    ATTRIBUTES,
    HELD_OUT_PAIRS,
    NUM_CAPTIONS,
    TEMPLATES,
    TEXT_LEN,
    VOCAB_SIZE,
    CaptionedShapes,
    all_captions,
    caption_attributes,
    caption_id,
    decode,
    expected_neighbours,
    hamming_distance_pmf,
)

NAMES = tuple(ATTRIBUTES)  # shape, colour, size, position, texture


def _attribute_matrix(ids: np.ndarray) -> np.ndarray:
    """``caption ids [n] -> int[n, 5]`` attribute indices."""
    attrs = caption_attributes(ids)
    return np.stack([attrs[k] for k in NAMES], axis=-1)


def test_same_index_same_example_and_different_indices_differ():
    a, b = CaptionedShapes("train"), CaptionedShapes("train")
    for i in (0, 1, 999_999):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    ex = a[3]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["text"].shape == (TEXT_LEN,) and ex["text"].dtype == np.int32
    assert ex["caption_id"].dtype == np.int32 and 0 <= ex["caption_id"] < NUM_CAPTIONS
    images = {a[i]["image"].tobytes() for i in range(300)}
    assert len(images) == 300  # jitter and noise: no two images are identical
    other_seed = CaptionedShapes("train", seed=1)
    assert not np.array_equal(other_seed[3]["image"], ex["image"])


def test_splits_are_disjoint():
    train, test = CaptionedShapes("train"), CaptionedShapes("test")
    assert len(train) == 1_000_000 and len(test) == 2_000
    seen = {train[i]["image"].tobytes() for i in range(400)}
    assert not any(test[i]["image"].tobytes() in seen for i in range(400))


def test_held_out_pairs_absent_from_train_present_in_test():
    held = set(HELD_OUT_PAIRS)
    assert len(held) == 8 and len({s for s, _ in held}) == 8 and len({c for _, c in held}) == 8
    train = CaptionedShapes("train")
    pairs = {(a["shape"], a["colour"]) for a, _ in map(train.attributes, range(20_000))}
    assert not pairs & held
    assert len(pairs) == 56  # every other pair occurs
    test = CaptionedShapes("test")
    novel = [test.attributes(i)[0] for i in range(1, 2000, 2)]
    assert {(a["shape"], a["colour"]) for a in novel} == held
    seen = [test.attributes(i)[0] for i in range(0, 2000, 2)]
    assert not {(a["shape"], a["colour"]) for a in seen} & held
    assert [bool(test[i]["novel"]) for i in range(6)] == [False, True] * 3


def test_captions_name_the_drawn_attributes():
    src = CaptionedShapes("test")
    templates = set()
    for i in range(300):
        ex = src[i]
        attrs = {k: int(ex[k]) for k in NAMES}
        assert decode(ex["text"]) == attrs
        assert int(ex["caption_id"]) == caption_id(*attrs.values())
        assert {k: int(v) for k, v in caption_attributes(ex["caption_id"]).items()} == attrs
        assert ex["text"][0] == 1 and (ex["text"] < VOCAB_SIZE).all()
        n = int((ex["text"] > 0).sum())
        assert ex["text"][n - 1] == 2 and not ex["text"][n:].any()  # BOS ... EOS PAD...
        templates.add(int(ex["template"]))
    assert templates == set(range(len(TEMPLATES)))


def test_all_captions_lists_every_combination_once():
    tokens, ids = all_captions()
    assert tokens.shape == (NUM_CAPTIONS, TEXT_LEN) and tokens.dtype == np.int32
    np.testing.assert_array_equal(ids, np.arange(NUM_CAPTIONS))
    assert NUM_CAPTIONS == 8 * 8 * 3 * 9 * 3
    assert len({t.tobytes() for t in tokens}) == NUM_CAPTIONS
    for k in (0, 1, 777, NUM_CAPTIONS - 1):
        attrs = {n: int(v) for n, v in caption_attributes(k).items()}
        assert decode(tokens[k]) == attrs
    # Another template says the same thing in another order.
    other, _ = all_captions(template=1)
    assert decode(other[777]) == decode(tokens[777]) and not np.array_equal(other[777], tokens[777])


def test_images_show_the_position_and_colour_of_the_caption():
    src = CaptionedShapes("train")
    centres = np.array(rendering._CELL_CENTRE)
    checked = 0
    for i in range(400):
        ex = src[i]
        if ex["texture"] != 0:  # plain objects: every object pixel has the full colour
            continue
        image = ex["image"].astype(np.float32) / 255.0
        bg = np.median(image.reshape(-1, 3), axis=0)
        obj = np.abs(image - bg).max(-1) > 0.3  # noise is at most 0.07, colours differ by > 0.4
        ys, xs = np.nonzero(obj)
        row, col = divmod(int(ex["position"]), 3)
        assert np.argmin(np.abs(centres - (ys.mean() + 0.5))) == row, i
        assert np.argmin(np.abs(centres - (xs.mean() + 0.5))) == col, i
        np.testing.assert_allclose(
            image[obj].mean(0), rendering._COLOUR_RGB[int(ex["colour"])], atol=0.1, err_msg=str(i)
        )
        checked += 1
    assert checked > 100


def test_hamming_pmf_matches_enumeration():
    # Brute force over every pair of training combinations, uniform over the 4,536 allowed.
    attrs = _attribute_matrix(np.arange(NUM_CAPTIONS))
    held = np.zeros((8, 8), bool)
    held[tuple(np.array(HELD_OUT_PAIRS).T)] = True
    allowed = attrs[~held[attrs[:, 0], attrs[:, 1]]].astype(np.int8)
    assert len(allowed) == 56 * 81
    counts = np.zeros(6)
    for start in range(0, len(allowed), 512):
        d = (allowed[start : start + 512, None, :] != allowed[None, :, :]).sum(-1)
        counts += np.bincount(d.ravel(), minlength=6)
    np.testing.assert_allclose(hamming_distance_pmf("train"), counts / counts.sum(), rtol=1e-12)
    assert hamming_distance_pmf("train")[1] == pytest.approx(1 / 189, rel=1e-12)
    assert hamming_distance_pmf("test").sum() == pytest.approx(1.0, rel=1e-12)
    assert expected_neighbours(1) == 0.0
    assert expected_neighbours(8192) == pytest.approx(8191 / 189, rel=1e-12)


def test_expected_hard_negatives_match_monte_carlo_on_real_batches():
    b, steps = 512, 16
    ds = train_dataset("shapes", global_batch_size=b, seed=3)
    per_batch = {0: [], 1: []}
    for s in range(steps):
        attrs = _attribute_matrix(ds[s]["caption_id"])
        d = (attrs[:, None, :] != attrs[None, :, :]).sum(-1)  # (b, b) Hamming distances
        np.fill_diagonal(d, -1)  # an anchor is not its own negative
        for dist in per_batch:
            per_batch[dist].append((d == dist).sum(1).mean())  # mean count per anchor
    for dist, values in per_batch.items():
        mc, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(steps)
        exact = expected_neighbours(b, dist)
        assert abs(mc - exact) < 4 * se, (dist, mc, exact, se)
        assert abs(mc - exact) < 0.1 * exact + 0.01, (dist, mc, exact)
    # The held-out-rich test split has its own distribution: check it too, from the source.
    test = CaptionedShapes("test")
    ids = np.array([caption_id(*(test.attributes(i)[0][k] for k in NAMES)) for i in range(2000)])
    attrs = _attribute_matrix(ids)
    d = (attrs[:, None, :] != attrs[None, :, :]).sum(-1)
    np.fill_diagonal(d, -1)
    mc = (d == 1).sum(1).mean()  # the 2,000 examples as one batch
    assert mc == pytest.approx(expected_neighbours(2000, 1, "test"), rel=0.1)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split must be one of train, test"):
        CaptionedShapes("val")
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        CaptionedShapes("train", num_examples=0)
    with pytest.raises(IndexError, match="out of range"):
        CaptionedShapes("test")[2000]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        expected_neighbours(0)
    with pytest.raises(ValueError, match="distance must lie in"):
        expected_neighbours(32, 6)
    with pytest.raises(ValueError, match="caption ids must lie in"):
        caption_attributes(NUM_CAPTIONS)


def test_hard_negatives_are_one_attribute_apart_and_never_held_out():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cs.NUM_CAPTIONS, 500)
    tokens, neg = cs.one_attribute_apart(ids, 4, rng)
    assert tokens.shape == (500, 4, cs.TEXT_LEN) and neg.shape == (500, 4)
    own, other = cs.caption_attributes(ids), cs.caption_attributes(neg)
    differ = sum((own[k][:, None] != other[k]).astype(int) for k in cs.ATTRIBUTES)
    assert np.all(differ == 1)
    assert not any(
        (int(s), int(c)) in cs.HELD_OUT_PAIRS
        for s, c in zip(other["shape"].ravel(), other["colour"].ravel(), strict=True)
    )
    decoded = [cs.decode(t) for t in tokens.reshape(-1, cs.TEXT_LEN)[:50]]
    assert [cs.caption_id(*(d[k] for k in cs.ATTRIBUTES)) for d in decoded] == neg.ravel()[
        :50
    ].tolist()
    # Every attribute is the one that changes, sometimes (uniform choice of attribute).
    changed = {k for k in cs.ATTRIBUTES if np.any(own[k][:, None] != other[k])}
    assert changed == set(cs.ATTRIBUTES)
