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
import os
from typing import Any

import numpy as np

from contrastive.data.pipeline import (
    DatasetSpec,
    Subrange,
    TableSource,
    TrainExamples,
    eval_arrays,
    load_source,
    train_examples,
)
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
    locked image tower's features (None: images)."""

    examples: TrainExamples
    eval: dict[str, dict[str, np.ndarray]]
    num_train: int
    train_source: Any
    feature_width: int | None = None

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
    source = load_source(d.dataset, spec.train_split, d.data_dir)
    v = d.validation_examples
    n_train = d.train_examples if d.train_examples is not None else len(source) - v
    _check_split(n_train, v, len(source))
    eval_kw = dict(data_dir=d.data_dir, image_size=d.image_size, tokenizer=tokenizer)
    test = eval_arrays(d.dataset, spec.test_split, max_examples=d.eval_examples, **eval_kw)
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
    return RunData(examples, evals, n_train, train_source)


def _locked(cfg: Any, spec: DatasetSpec, n_train: int, v: int, test: dict) -> RunData:
    """Batches of locked features, caption tokens and ids; features in the eval arrays."""
    from contrastive import locked_tower

    d, r, m = cfg.data, cfg.run, cfg.model
    n_test = len(test["caption_id"])
    if m.locked_image == LOCKED_PRETRAINED:
        cache = r.feature_cache or os.path.join(r.workdir, "features")
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
    return RunData(examples, evals, n_train, table, feature_width=int(feats.shape[1]))
