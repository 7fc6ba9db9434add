"""Data for contrastive training: TFDS array_record sources, grain pipelines, augmentations.

``train_dataset(name, ...)[step]`` is a host's batch for a step (deterministic given the
seed); ``eval_arrays`` gives un-augmented arrays for linear probes, k-NN and retrieval.
The offline default dataset ``digits`` is built from scikit-learn's bundled digits;
``shapes`` (:mod:`contrastive.data.captioned_shapes`) is an image-caption set generated in
code, with fine-grained negatives and a list of all its captions for zero-shot evaluation.
"""

from contrastive.data.augment import AugmentConfig, simclr_view
from contrastive.data.captioned_shapes import CaptionedShapes, all_captions, expected_neighbours
from contrastive.data.digits import SklearnDigits, prepare_digits
from contrastive.data.pipeline import (
    DATASETS,
    BatchIterator,
    DatasetSpec,
    class_captions,
    eval_arrays,
    get_spec,
    host_batch_size,
    load_source,
    train_dataset,
)
from contrastive.data.text import HashTokenizer

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "BatchIterator",
    "CaptionedShapes",
    "DatasetSpec",
    "HashTokenizer",
    "SklearnDigits",
    "all_captions",
    "class_captions",
    "eval_arrays",
    "expected_neighbours",
    "get_spec",
    "host_batch_size",
    "load_source",
    "prepare_digits",
    "simclr_view",
    "train_dataset",
]
