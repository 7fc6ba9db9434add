"""Captioned shapes: an offline, procedurally generated image-caption data set with hard negatives.

Each example is a 32x32 RGB scene of one object whose five attributes are drawn at random,
and a caption that names all five, as token ids from the fixed vocabulary :data:`VOCAB`::

    shape    8  circle square triangle diamond cross ring hexagon oval
    colour   8  red green blue yellow cyan magenta orange white
    size     3  small medium large
    position 9  top left, top, top right, left, centre, right, bottom left, bottom, bottom right
    texture  3  plain striped checked

8 * 8 * 3 * 9 * 3 = 5,184 distinct captions (:data:`NUM_CAPTIONS`). Every caption has
``8 - 1 + 8 - 1 + 3 - 1 + 9 - 1 + 3 - 1 = 26`` neighbours that differ from it in exactly one
attribute: the hard negatives of contrastive learning, as "a dog on a red sofa" vs "a dog on
a blue sofa" are in web data. Nothing is stored: example ``index`` of ``split`` is a pure
function of ``(seed, split, index)`` through ``np.random.default_rng([seed, split_id,
index])``, so a split can hold millions of examples at no cost, and every host and run sees
the same ones.

Why it exists. The benefit of large contrastive batches (SimCLR, Chen et al. 2020; CLIP,
Radford et al. 2021; SigLIP, Zhai et al. 2023; DCL, Yeh et al. 2022; Inf-CL, Cheng et al.
2024) comes from negatives that are hard to tell from the positive; a batch of ``B`` holds
more of them the larger ``B``. Here that count is known exactly: an anchor's expected number
of batch-mates at Hamming distance 1 (one attribute apart) is ``(B - 1) * P(d = 1)``, with
``P`` computed from the attribute distribution by :func:`expected_neighbours`. On ``train``:

    =====  ===========================  ==================================
      B    one attribute apart, d = 1   same caption, d = 0 (false negs)
    =====  ===========================  ==================================
       32           0.1640                          0.0068
       64           0.3333                          0.0139
      128           0.6720                          0.0280
      256           1.3492                          0.0562
      512           2.7037                          0.1127
     1024           5.4127                          0.2255
     2048          10.8307                          0.4513
     4096          21.6667                          0.9028
     8192          43.3386                          1.8058
    =====  ===========================  ==================================

At ``B = 32`` an anchor rarely meets a hard negative; at
``B = 8192`` it meets 43, and 1.8 exact duplicates (same caption, different image), which
InfoNCE treats as negatives (hard negatives: Robinson et al. 2021; compositional scenes as
a controlled test bed: CLEVR, Johnson et al. 2017). ``P(d = 1) = 1/189`` on
``train``, whose 56 (shape, colour) pairs leave 4,536 of the 5,184 captions.

A caveat for readers of accuracy numbers: a random guess among the 5,184 captions is right
with probability 1/5,184; a model that knows four attributes and guesses the fifth is right
1/3 to 1/9 of the time, so zero-shot top-1 rises steeply only once all five are learned.

Splits. ``train`` (default 1,000,000 examples) never shows the 8 held-out (shape, colour)
pairs of :data:`HELD_OUT_PAIRS` (one per shape and one per colour: red circle, yellow square,
orange triangle, green diamond, cyan cross, white ring, blue hexagon, magenta oval);
(shape, colour) is drawn uniformly from the other 56 pairs, size, position and texture
uniformly and independently. ``test`` (default 2,000): odd indices draw from the held-out
pairs (compositions never seen in training), even indices from the 56 seen ones, the rest as
in ``train``. Different split ids seed different streams, so no index of one split yields an
image of the other.

Images: a dark noisy background of random grey level, the object rendered with vectorised
coordinate masks (no pixel loops), with jitter that keeps the caption true: sub-cell position
(+-1.5 px around the cell centre), size (+-10 %, size classes stay disjoint), rotation
(+-0.25 rad), colour (+-0.06 per channel), stripe/check phase, and uniform pixel noise of
standard deviation 0.04.
Captions: ``BOS words EOS PAD...`` in ``int32[TEXT_LEN]`` (PAD = 0, BOS = 1, EOS = 2, as in
:class:`contrastive.data.text.HashTokenizer`), word order drawn from :data:`TEMPLATES`, e.g.
"a small red striped circle at the top left" / "at the top left a small red striped circle".

Speed, one core of a 2-core machine shared with other jobs: the source made 11,400
examples/s (20,000 examples, timed in one process); the training pipeline
(``train_dataset("shapes", ...)[step]``: shuffle, batch, to float32) 8,500 examples/s, a
batch of 2048 in 0.24 s and of 8192 in 1.04 s, built by ``BatchIterator``'s background thread
while the model trains on the previous one.

Example::

    >>> from contrastive.data.captioned_shapes import (
    ...     NUM_CAPTIONS, CaptionedShapes, all_captions, decode)
    >>> src = CaptionedShapes("train")
    >>> ex = src[0]
    >>> ex["image"].shape, ex["text"].shape, int(ex["caption_id"]) < NUM_CAPTIONS
    ((32, 32, 3), (16,), True)
    >>> tokens, ids = all_captions()        # int32[5184, 16], int32[5184]
    >>> decode(tokens[ids == ex["caption_id"]][0]) == decode(ex["text"])
    True
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from contrastive.data.shape_rendering import IMAGE_SIZE as IMAGE_SIZE
from contrastive.data.shape_rendering import render
from contrastive.data.text import BOS, EOS, PAD

__all__ = [
    "ATTRIBUTES",
    "HELD_OUT_PAIRS",
    "NUM_CAPTIONS",
    "TEMPLATES",
    "TEXT_LEN",
    "VOCAB",
    "VOCAB_SIZE",
    "CaptionedShapes",
    "all_captions",
    "caption_attributes",
    "caption_id",
    "decode",
    "encode",
    "expected_neighbours",
    "hamming_distance_pmf",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "oval")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
TEXTURES = ("plain", "striped", "checked")
#: Attribute name -> its values, in caption-id order (shape varies slowest, texture fastest).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "texture": TEXTURES,
}
_RADIX = tuple(len(v) for v in ATTRIBUTES.values())  # (8, 8, 3, 9, 3)
NUM_CAPTIONS = int(np.prod(_RADIX))  # 5184

#: (shape, colour) index pairs absent from ``train``: a Latin transversal, so each shape and
#: each colour is seen in training in 7 of its 8 combinations.
HELD_OUT_PAIRS: tuple[tuple[int, int], ...] = tuple((s, (3 * s) % 8) for s in range(8))
_HELD_OUT = np.zeros((8, 8), bool)
_HELD_OUT[tuple(np.array(HELD_OUT_PAIRS).T)] = True
_SEEN_PAIRS = np.argwhere(~_HELD_OUT)  # (56, 2)
_NOVEL_PAIRS = np.argwhere(_HELD_OUT)  # (8, 2)

#: Word orders; "{pos}" is the position phrase's words. Template 0 is the canonical one.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {texture} {shape} at the {pos}",
    "at the {pos} a {size} {colour} {texture} {shape}",
    "there is a {size} {colour} {texture} {shape} at the {pos}",
    "a {texture} {shape} at the {pos} {size} and {colour}",
)
_EXTRA_WORDS = ("a", "at", "the", "there", "is", "and")
_POSITION_WORDS = ("top", "bottom", "left", "right", "centre")
#: Token id -> word; ids 0, 1, 2 are PAD, BOS, EOS.
VOCAB: tuple[str, ...] = (
    ("<pad>", "<bos>", "<eos>")
    + _EXTRA_WORDS
    + SHAPES
    + COLOURS
    + SIZES
    + TEXTURES
    + _POSITION_WORDS
)
VOCAB_SIZE = len(VOCAB)  # 36
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}
#: Caption length in tokens: the longest template (11 words) + BOS + EOS, padded to 16.
TEXT_LEN = 16
SPLITS = {"train": 0, "test": 1}
DEFAULT_SIZES = {"train": 1_000_000, "test": 2_000}


# --------------------------------------------------------------------------- attributes / ids


def caption_id(shape: int, colour: int, size: int, position: int, texture: int) -> int:
    """Index of an attribute combination in :func:`all_captions` (mixed radix, texture fastest)."""
    return int(np.ravel_multi_index((shape, colour, size, position, texture), _RADIX))


def caption_attributes(ids: np.ndarray | int) -> dict[str, np.ndarray]:
    """Inverse of :func:`caption_id`: ``ids [...]`` -> ``{attribute: int index [...]}``."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= NUM_CAPTIONS):
        raise ValueError(
            f"caption ids must lie in [0, {NUM_CAPTIONS}), got {ids.min()}..{ids.max()}"
        )
    return dict(zip(ATTRIBUTES, np.unravel_index(ids, _RADIX), strict=True))


def encode(attrs: dict[str, int], template: int = 0) -> np.ndarray:
    """Attribute indices -> caption tokens ``int32[TEXT_LEN]``: BOS, words, EOS, PAD..."""
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must lie in [0, {len(TEMPLATES)}), got {template}")
    words = (
        TEMPLATES[template]
        .format(
            **{k: ATTRIBUTES[k][int(attrs[k])] for k in ATTRIBUTES if k != "position"},
            pos=POSITIONS[int(attrs["position"])],
        )
        .split()
    )
    out = np.full((TEXT_LEN,), PAD, np.int32)
    out[: len(words) + 2] = [BOS, *(_WORD_ID[w] for w in words), EOS]
    return out


def decode(tokens: np.ndarray) -> dict[str, int]:
    """Caption tokens ``int32[L]`` -> attribute indices, whatever the template's word order.

    Each of shape, colour, size and texture has exactly one word in a caption; the position
    is read from the words top/bottom (row) and left/right (column), "centre" alone being
    the middle cell.
    """
    words = [VOCAB[t] for t in np.asarray(tokens).tolist() if t > EOS]
    out = {}
    for name in ("shape", "colour", "size", "texture"):
        found = [ATTRIBUTES[name].index(w) for w in words if w in ATTRIBUTES[name]]
        if len(found) != 1:
            raise ValueError(f"caption {' '.join(words)!r} names {len(found)} {name}s, not 1")
        out[name] = found[0]
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    out["position"] = 3 * row + col
    return out


def all_captions(template: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct caption in one word order, for zero-shot classification.

    Returns ``(tokens int32[NUM_CAPTIONS, TEXT_LEN], ids int32[NUM_CAPTIONS])``; ``ids`` is
    ``arange(NUM_CAPTIONS)``, so row ``k`` is the caption with ``caption_id == k``; held-out
    combinations are included.
    """
    ids = np.arange(NUM_CAPTIONS, dtype=np.int32)
    attrs = caption_attributes(ids)
    tokens = np.stack(
        [encode({k: v[i] for k, v in attrs.items()}, template) for i in range(NUM_CAPTIONS)]
    )
    return tokens, ids


# --------------------------------------------------------------------------- hard negatives


def one_attribute_apart(
    caption_ids: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` hard-negative captions per caption: each differs in exactly one attribute.

    For every id of ``caption_ids [n]``: an attribute drawn uniformly, then a new value for
    it drawn uniformly among the others, never making a (shape, colour) pair held out of
    ``train`` (so no held-out composition reaches training, not even as text). The tokens
    use a random word order (as the positives do, so that the order tells nothing).

    Returns ``(tokens int32[n, count, TEXT_LEN], ids int32[n, count])``.
    """
    caption_ids = np.asarray(caption_ids).reshape(-1)
    attrs = caption_attributes(caption_ids)
    names = list(ATTRIBUTES)
    ids = np.empty((len(caption_ids), count), np.int32)
    tokens = np.empty((len(caption_ids), count, TEXT_LEN), np.int32)
    for i in range(len(caption_ids)):
        for j in range(count):
            new = {k: int(v[i]) for k, v in attrs.items()}
            while True:
                name = names[rng.integers(len(names))]
                value = int(rng.integers(_RADIX[names.index(name)] - 1))
                value += value >= new[name]  # uniform among the other values
                trial = dict(new, **{name: value})
                if not _HELD_OUT[trial["shape"], trial["colour"]]:
                    break
            ids[i, j] = caption_id(*(trial[k] for k in ATTRIBUTES))
            tokens[i, j] = encode(trial, int(rng.integers(len(TEMPLATES))))
    return tokens, ids


def _pmf_same(p: np.ndarray) -> np.ndarray:
    """``[P(d=0), P(d=1)]`` of one attribute with pmf ``p`` for two independent draws."""
    same = float(np.sum(p * p))
    return np.array([same, 1.0 - same])


def hamming_distance_pmf(split: str = "train") -> np.ndarray:
    """``float64[6]``: P(two independent examples of ``split`` differ in exactly d attributes).

    Exact: (shape, colour) is one joint draw (held-out pairs make them dependent), size,
    position and texture are independent uniform draws, so the pmf of the distance is the
    convolution of the per-factor pmfs. Mixed ``test`` draws are half novel, half seen pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    joint = np.zeros((8, 8))
    if split == "train":
        joint[~_HELD_OUT] = 1.0 / len(_SEEN_PAIRS)
    else:
        joint[~_HELD_OUT] = 0.5 / len(_SEEN_PAIRS)
        joint[_HELD_OUT] = 0.5 / len(_NOVEL_PAIRS)
    ps, pc = joint.sum(1), joint.sum(0)  # marginals of shape and colour
    both_same = float(np.sum(joint * joint))
    shape_same, colour_same = float(np.sum(ps * ps)), float(np.sum(pc * pc))
    # d over (shape, colour): 0 both same, 2 both differ, 1 the rest (inclusion-exclusion).
    d2 = 1.0 - shape_same - colour_same + both_same
    pmf = np.array([both_same, 1.0 - both_same - d2, d2])
    for name in ("size", "position", "texture"):
        n = len(ATTRIBUTES[name])
        pmf = np.convolve(pmf, _pmf_same(np.full(n, 1.0 / n)))
    return pmf


def expected_neighbours(batch_size: int, distance: int = 1, split: str = "train") -> float:
    """Expected number of an anchor's batch-mates whose caption is ``distance`` attributes away.

    A batch holds ``B`` independent draws (distinct indices are independent streams), so
    ``E = (B - 1) * P(d = distance)``. ``distance=1``: the hard negatives; ``distance=0``:
    duplicates of the anchor's caption (false negatives for InfoNCE). The expected number of
    such pairs in the whole batch is ``B * E / 2``.
    """
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= distance <= len(ATTRIBUTES):
        raise ValueError(f"distance must lie in [0, {len(ATTRIBUTES)}], got {distance}")
    return float((batch_size - 1) * hamming_distance_pmf(split)[distance])


# --------------------------------------------------------------------------- the source


class CaptionedShapes:
    """Random-access source of ``split``: ``len(src)`` examples, ``src[i]`` generated on demand.

    Use it like a TFDS source: ``grain.MapDataset.source(CaptionedShapes("train"))``.
    ``src[i]`` is a dict of NumPy arrays:

    - ``image: uint8[32, 32, 3]``; ``text: int32[TEXT_LEN]`` (a random template);
    - ``caption_id: int32[]``, the row of :func:`all_captions` naming the same attributes;
    - ``shape, colour, size, position, texture: int32[]`` attribute indices;
    - ``template: int32[]``; ``novel: bool[]`` (a (shape, colour) pair never seen in train).

    Args:
      split: ``"train"`` or ``"test"``.
      num_examples: the split's length (default 1,000,000 / 2,000); any size, nothing stored.
      seed: the data set's seed; ``(seed, split, index)`` determines an example.
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        *,
        num_examples: int | None = None,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        n = DEFAULT_SIZES[split] if num_examples is None else num_examples
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.num_examples, self.seed = split, int(n), int(seed)
        self._split_id = SPLITS[split]

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"CaptionedShapes({self.split!r}, num_examples={self.num_examples}, seed={self.seed})"
        )

    def _pairs(self, index: int) -> np.ndarray:
        """The (shape, colour) pairs example ``index`` draws from."""
        if self.split == "test" and index % 2 == 1:
            return _NOVEL_PAIRS
        return _SEEN_PAIRS

    def attributes(self, index: int) -> tuple[dict[str, int], np.random.Generator]:
        """Example ``index``'s attributes and template, and the generator that renders it."""
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, self._split_id, index])
        pairs = self._pairs(index)
        # One call for the five draws: floor(u * n) is uniform on range(n) (the minimum
        # guards against u * n rounding up to n).
        counts = np.array((len(pairs), 3, 9, 3, len(TEMPLATES)))
        draws = np.minimum((rng.random(5) * counts).astype(np.int64), counts - 1)
        pair, size, position, texture, template = draws.tolist()
        shape, colour = pairs[pair]
        attrs = {
            "shape": int(shape),
            "colour": int(colour),
            "size": int(size),
            "position": int(position),
            "texture": int(texture),
            "template": int(template),
        }
        return attrs, rng

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        attrs, rng = self.attributes(index)
        cid = caption_id(*(attrs[k] for k in ATTRIBUTES))
        out = {
            "image": render(attrs, rng),
            "text": encode(attrs, attrs["template"]),
            "caption_id": np.int32(cid),
            "novel": np.bool_(_HELD_OUT[attrs["shape"], attrs["colour"]]),
        }
        out.update({k: np.int32(v) for k, v in attrs.items()})
        return out
