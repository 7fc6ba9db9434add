"""The data sets there are: each one's spec (kind, sizes, augmentation, metrics), by name.

:data:`DATASETS` names the built-in sets; :func:`get_spec` also reads a user's own pairs
(:func:`own_pairs_spec`); :func:`metric_names`, :func:`lower_is_better` and
:func:`target_reached` say what a run on a set measures and when ``--stop-at`` is met.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np

from contrastive.data import captioned_shapes, own_pairs
from contrastive.data.augment import AugmentConfig
from contrastive.data.digits import NAME as DIGITS_TFDS_NAME

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset and what its examples become.

    ``vocab_size`` and ``text_len`` are set for a data set that brings its own caption tokens
    (``text: int32[text_len]`` with ids in ``[0, vocab_size)``, 0 = padding): the text tower
    must use them, and any ``tokenizer`` passed to the pipeline is ignored. ``None``: captions
    are strings, tokenized by the caller's :class:`HashTokenizer`. ``class_captions``: the
    data set lists all its captions (:func:`class_captions`) and its examples carry
    ``caption_id``, for zero-shot classification and duplicate-aware retrieval.
    """

    tfds_name: str
    kind: Literal["image", "image_text"]
    train_split: str
    test_split: str
    image_size: int  # side of the (square) images fed to the model
    channels: int
    num_classes: int = 0  # 0: no labels (image-text pairs)
    augment: AugmentConfig = AugmentConfig()
    vocab_size: int | None = None
    text_len: int | None = None
    class_captions: bool = False


DATASETS: dict[str, DatasetSpec] = {
    # Digits are not mirror-symmetric (a flipped 2 looks like a 5): no flips, grey jitter only.
    "digits": DatasetSpec(
        DIGITS_TFDS_NAME,
        "image",
        "train",
        "test",
        16,
        1,
        10,
        AugmentConfig(image_size=16, crop_scale=(0.4, 1.0), flip=False),
    ),
    "cifar10": DatasetSpec("cifar10", "image", "train", "test", 32, 3, 10, AugmentConfig(32)),
    "cifar100": DatasetSpec("cifar100", "image", "train", "test", 32, 3, 100, AugmentConfig(32)),
    # STL-10 is 96x96; 64 keeps CPU runs affordable (use --image-size 96 for the full size).
    "stl10": DatasetSpec("stl10", "image", "train", "test", 64, 3, 10, AugmentConfig(64)),
    # Explicit version: TFDS then reads the prepared files' metadata instead of running the
    # builder code, whose feature spec needs TensorFlow.
    "coco_captions": DatasetSpec(
        "coco_captions/2014:1.1.0",
        "image_text",
        "train",
        "val",
        64,
        3,
        0,
        AugmentConfig(64, crop_scale=(0.5, 1.0), flip=False, jitter_prob=0.0, grayscale_prob=0.0),
    ),
    # Generated on the fly, offline. No crop or flip: the caption names the position.
    "shapes": DatasetSpec(
        "captioned_shapes",
        "image_text",
        "train",
        "test",
        captioned_shapes.IMAGE_SIZE,
        3,
        0,
        AugmentConfig(captioned_shapes.IMAGE_SIZE, flip=False, jitter_prob=0.0, grayscale_prob=0.0),
        vocab_size=captioned_shapes.VOCAB_SIZE,
        text_len=captioned_shapes.TEXT_LEN,
        class_captions=True,
    ),
}


def own_pairs_spec(directory: str) -> DatasetSpec:
    """The spec of a directory of own pairs: image-text, captions tokenized by the run,
    images at their prepared size, augmented as ``coco_captions`` (crops of at least half
    the image, no flips or colour changes: a caption may name a side or a colour)."""
    s = own_pairs.read_spec(directory)["image_size"]
    return DatasetSpec(
        os.path.abspath(os.path.expanduser(directory)),
        "image_text",
        "train",
        "test",
        s,
        3,
        0,
        AugmentConfig(s, crop_scale=(0.5, 1.0), flip=False, jitter_prob=0.0, grayscale_prob=0.0),
    )


def metric_names(spec: DatasetSpec, *, validation: bool = False) -> list[str]:
    """The evaluation metrics a run on ``spec`` reports (``val_*`` with a validation split)."""
    if spec.kind == "image":
        return ["linear_probe", "knn"]
    if not spec.class_captions:
        return [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    names = ["zero_shot_top1", "zero_shot_top1_novel", "zero_shot_xent"]
    names += [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5)]
    if validation:  # carved from the training split: no never-seen compositions
        names += [f"val_{n}" for n in names if n != "zero_shot_top1_novel"]
    return names


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (the cross-entropies): a target of it is
    reached when the value falls to it or below, not when it rises to it."""
    return metric.endswith("_xent")


def target_reached(metric: str, value: float, target: float) -> bool:
    """Whether ``value`` of ``metric`` has reached ``target`` (in the metric's direction)."""
    return value <= target if lower_is_better(metric) else value >= target


def get_spec(name: str, image_size: int | None = None) -> DatasetSpec:
    """The spec of a known dataset or of a directory of own pairs
    (:mod:`contrastive.data.own_pairs`), optionally at another image size."""
    if name in DATASETS:
        spec = DATASETS[name]
    elif own_pairs.is_prepared(name):
        spec = own_pairs_spec(name)
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, or a directory "
            "prepared by python -m experiments.prepare_pairs"
        )
    if image_size is not None and image_size != spec.image_size:
        if image_size < 4:
            raise ValueError(f"image size must be at least 4, got {image_size}")
        spec = dataclasses.replace(
            spec,
            image_size=image_size,
            augment=dataclasses.replace(spec.augment, image_size=image_size),
        )
    return spec
