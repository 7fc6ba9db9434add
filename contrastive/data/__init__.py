"""Data for contrastive training: TFDS array_record sources, grain pipelines, augmentations.

``train_dataset(name, ...)[step]`` is a host's batch for a step (deterministic given the
seed); ``eval_arrays`` gives un-augmented arrays for linear probes, k-NN and retrieval.
The offline default dataset ``digits`` is built from scikit-learn's bundled digits.
"""

from contrastive.data.augment import AugmentConfig, simclr_view
from contrastive.data.digits import SklearnDigits, prepare_digits
from contrastive.data.pipeline import (
    DATASETS,
    BatchIterator,
    DatasetSpec,
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
    "DatasetSpec",
    "HashTokenizer",
    "SklearnDigits",
    "eval_arrays",
    "get_spec",
    "host_batch_size",
    "load_source",
    "prepare_digits",
    "simclr_view",
    "train_dataset",
]
