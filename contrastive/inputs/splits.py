"""A run's data: the training pipeline, a validation split carved from train, the test split.

:func:`run_data` reads the data settings of a :class:`~contrastive.configs.Config`:

- ``train_examples N``: train on examples ``[0, N)`` of the training split;
- ``validation_examples V``: examples ``[N, N + V)`` of the training split are the
  validation split, never trained on (what the batch-size study tunes on; the test split is
  only reported);
- ``locked_image``: the image tower is locked (LiT, Zhai et al. 2022; SigLiT, Zhai et al.
  2023), so its features of every image are computed once (or read from the user's files)
  and the batches carry feature rows in place of images: a step runs only the text side,
  the heads and the loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from contrastive.data import own_pairs
from contrastive.data.feature_cache import CacheWriteError, check_cache_dir
from contrastive.data.pipeline import (
    DATASETS,
    DatasetSpec,
    TableSource,
    TrainExamples,
    eval_arrays,
    load_source,
    train_examples,
)
from contrastive.data.sources import Subrange
from contrastive.data.text import HashTokenizer

__all__ = ["RunData", "run_data", "LOCKED_PRETRAINED"]

LOCKED_PRETRAINED = "pretrained"


@dataclasses.dataclass
class RunData:
    """``examples``: the training examples in training order, one at a time (what the
    streamed gradient cache reads); ``train``: this host's batches by step, the same
    examples batched (``examples.batches()``); ``eval``: arrays per evaluated split;
    ``num_train``: the training examples; ``train_source``: those examples, random access
    (``train_source[i]``: example ``i``, un-shuffled, un-augmented; a :class:`TableSource` of
    locked features, tokens and ids in the locked-tower mode); ``feature_width``: F of a
    locked image tower's features (None: images); ``inputs``: ``{name: sha256}`` of the
    inputs the run did not compute itself (the locked features of the training and test
    splits), part of the run's identity, so that features changed between a stop and a
    resume are refused."""

    examples: TrainExamples
    eval: dict[str, dict[str, np.ndarray]]
    num_train: int
    train_source: Any
    feature_width: int | None = None
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def train(self) -> Any:
        return self.examples.batches()


def _check_split(n_train: int, v: int, total: int) -> None:
    if n_train + v > total:
        raise ValueError(
            f"--train-examples {n_train} plus --validation-examples {v} exceed the training "
            f"split's {total} examples: lower one of them"
        )
    if n_train < 1:
        raise ValueError(
            f"--validation-examples {v} leaves no training example of the {total}: lower it"
        )


def run_data(cfg: Any, spec: DatasetSpec, tokenizer: HashTokenizer) -> RunData:
    """The training pipeline and evaluation arrays of ``cfg`` (a ``Config``).

    ValueError (one line) for settings the data cannot meet.
    """
    d, r = cfg.data, cfg.run
    test_source = None
    if d.dataset not in DATASETS:  # own pairs: the last --eval-examples are the test
        source, test_source = own_pairs.train_test(d.dataset, d.eval_examples)
    else:
        source = load_source(d.dataset, spec.train_split, d.data_dir)
    v = d.validation_examples
    n_train = d.train_examples if d.train_examples is not None else len(source) - v
    _check_split(n_train, v, len(source))
    eval_kw = dict(data_dir=d.data_dir, image_size=d.image_size, tokenizer=tokenizer)
    test = eval_arrays(
        d.dataset, spec.test_split, max_examples=d.eval_examples, source=test_source, **eval_kw
    )
    if cfg.model.locked_image is not None:
        return _locked(cfg, spec, n_train, v, test)
    train_source = source if n_train == len(source) else Subrange(source, 0, n_train)
    examples = train_examples(
        d.dataset,
        global_batch_size=r.batch_size,
        seed=r.seed,
        data_dir=d.data_dir,
        image_size=d.image_size,
        tokenizer=tokenizer,
        source=train_source,
    )
    evals = {"test": test}
    if spec.kind == "image":  # the probes fit on (part of) the training split
        evals["train"] = eval_arrays(
            d.dataset, spec.train_split, max_examples=d.eval_examples, source=train_source,
            **eval_kw,
        )  # fmt: skip
    if v:
        evals["val"] = eval_arrays(
            d.dataset, spec.train_split, max_examples=d.eval_examples,
            source=Subrange(source, n_train, n_train + v), **eval_kw,
        )  # fmt: skip
    inputs = {}
    if test_source is not None:  # own pairs: what they are and which ones train
        digest = own_pairs.read_spec(d.dataset)["data_sha256"]
        inputs["own_pairs"] = f"{digest}, last {d.eval_examples} held out"
    return RunData(examples, evals, n_train, train_source, inputs=inputs)


def _locked(cfg: Any, spec: DatasetSpec, n_train: int, v: int, test: dict) -> RunData:
    """Batches of locked features, caption tokens and ids; features in the eval arrays."""
    from contrastive.models import locked_tower

    d, r, m = cfg.data, cfg.run, cfg.model
    n_test = len(test["caption_id"])
    if m.locked_image == LOCKED_PRETRAINED:
        cache = r.feature_cache or os.path.join(r.workdir, "features")
        try:  # before pre-training, not after it
            check_cache_dir(cache)
        except CacheWriteError:
            # A read-only cache that holds the tower is fine to read; a feature entry it
            # lacks is one line when written (CacheWriteError), after seconds, not minutes.
            if not locked_tower.tower_cache_path(None, cache).exists():
                raise
        tower = locked_tower.pretrained_image_tower(cache_dir=cache)
        kw = dict(cache_dir=cache)
        feats = locked_tower.tower_features(
            tower, split=spec.train_split, num_examples=n_train + v, **kw
        )
        test_feats = locked_tower.tower_features(
            tower, split=spec.test_split, num_examples=n_test, **kw
        )
    else:
        directory = m.locked_image
        if not os.path.isdir(directory):
            raise ValueError(
                f"--locked-image {directory}: not a directory; pass 'pretrained' or a directory "
                "holding train.npy and test.npy"
            )
        feats = locked_tower.load_feature_file(
            os.path.join(directory, "train.npy"), num_examples=n_train + v
        )
        test_all = locked_tower.load_feature_file(
            os.path.join(directory, "test.npy"),
            num_examples=len(load_source(d.dataset, spec.test_split, d.data_dir)),
            split_name="test",
        )
        test_feats = test_all[:n_test]
        if test_all.shape[1] != feats.shape[1]:
            raise ValueError(
                f"--locked-image {directory}: train.npy has {feats.shape[1]} columns but "
                f"test.npy has {test_all.shape[1]}: compute both splits' features with the "
                "same model"
            )
    tokens, ids = locked_tower.shapes_captions(spec.train_split, n_train + v)
    table = TableSource(image=feats[:n_train], text=tokens[:n_train], caption_id=ids[:n_train])
    examples = train_examples(d.dataset, global_batch_size=r.batch_size, seed=r.seed, source=table)
    evals = {"test": {**test, "image": test_feats}}
    if v:
        k = min(v, d.eval_examples)
        rows = slice(n_train, n_train + k)
        evals["val"] = {
            "image": feats[rows],
            "text": tokens[rows],
            "caption_id": ids[rows],
            "novel": np.zeros(k, bool),
        }
    inputs = {
        "train features": _array_digest(feats[: n_train + v]),
        "test features": _array_digest(test_feats),
    }
    return RunData(
        examples, evals, n_train, table, feature_width=int(feats.shape[1]), inputs=inputs
    )


def _array_digest(a: np.ndarray) -> str:
    """sha256 of a float32 array's shape and bytes (what the run trains and evaluates on)."""
    a = np.ascontiguousarray(a, np.float32)
    return hashlib.sha256(f"{a.shape}|".encode() + a.tobytes()).hexdigest()
