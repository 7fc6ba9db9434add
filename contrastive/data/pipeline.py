"""TFDS and generated data sources + grain pipelines for contrastive training and evaluation.

``tfds.data_source`` gives random access to array_record files (no TensorFlow); grain's
``MapDataset`` turns it into an infinite, shuffled, augmented, batched *random-access*
sequence: ``train_dataset(...)[step]`` is this host's batch for ``step``. Batches are a pure
function of ``(seed, step, process_index)``, so the data-iterator position saved in a
checkpoint is just the next step, and a resumed run sees exactly the batches an
uninterrupted run would have seen. ``train_examples(...)`` is the same order one example at
a time (what the streamed gradient cache reads, chunk by chunk); ``train_dataset`` is that
view batched.

``shapes`` (:mod:`contrastive.data.captioned_shapes`) is generated in code: no preparation,
no files. It brings its own caption tokens (``spec.vocab_size``, ``spec.text_len``) and the
list of all its captions (``spec.class_captions``, :func:`class_captions`) for zero-shot
classification.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grain
import jax
import numpy as np

from contrastive.data import captioned_shapes
from contrastive.data.augment import eval_view
from contrastive.data.examples import (
    TableSource,
    first_caption,
    image_text_transform,
    load_source,
    own_token_arrays,
    own_token_batch,
    to_float,
    two_views_transform,
)
from contrastive.data.specs import (
    DATASETS,
    Batch,
    DatasetSpec,
    get_spec,
    lower_is_better,
    metric_names,
    own_pairs_spec,
    target_reached,
)
from contrastive.data.text import HashTokenizer

# The entry of the data sets: what the specs and per-example readers define is named here too.
__all__ = [
    "DATASETS",
    "BatchIterator",
    "DatasetSpec",
    "TableSource",
    "TrainExamples",
    "class_captions",
    "eval_arrays",
    "first_caption",
    "get_spec",
    "host_batch_size",
    "image_text_transform",
    "load_source",
    "lower_is_better",
    "metric_names",
    "own_pairs_spec",
    "own_token_batch",
    "target_reached",
    "to_float",
    "train_dataset",
    "train_examples",
    "two_views_transform",
]

# Data sets with class captions -> the function that lists them.
_CLASS_CAPTIONS = {"shapes": captioned_shapes.all_captions}


def class_captions(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every caption of a data set with class captions: ``(tokens int32[K, L], ids int32[K])``.

    Row ``k`` is the caption whose examples have ``caption_id == ids[k]`` (``ids`` is
    ``arange(K)``): embed the tokens with the text tower and pass them to
    :func:`contrastive.measure.evaluate.zero_shot_accuracy`. ``shapes``: ``K = 5184``, ``L = 16``.
    """
    if not get_spec(name).class_captions:
        raise ValueError(
            f"dataset {name!r} has no class captions: zero-shot needs one of "
            f"{', '.join(_CLASS_CAPTIONS)}"
        )
    return _cached_class_captions(name)


@functools.cache
def _cached_class_captions(name: str) -> tuple[np.ndarray, np.ndarray]:
    # Tokenizing the 5,184 captions took 40% of an evaluation in the study; every
    # evaluation of a run (and every run of a sweep) asks for the same arrays, which are
    # frozen so that no caller can change what the next one gets.
    arrays = _CLASS_CAPTIONS[name]()
    for a in arrays:
        a.setflags(write=False)
    return arrays


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """Examples per host; the global batch must split evenly over the hosts."""
    if global_batch_size % process_count:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {process_count} hosts: "
            f"use a multiple of {process_count}"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class TrainExamples:
    """The training examples one at a time, in the global order of the training batches.

    ``examples[i]`` is global example ``i`` of the run: the whole split shuffled (a new order
    every epoch, epochs one after the other, never mixed) and augmented per global index,
    infinite. ``collate(examples)`` stacks a list of them into the arrays of a host batch
    (the dict :func:`train_dataset` describes). Global batch ``s`` is examples ``s B ..
    (s + 1) B - 1`` (``B = global_batch_size``) and host ``p`` of ``P`` owns its ``b = B / P``
    consecutive rows ``(s P + p) b .. (s P + p + 1) b - 1``, so that

        batches()[s] == collate([examples[(s P + p) b + j] for j in range(b)])

    bit for bit: the in-memory pipeline is this view batched, and the streamed gradient
    cache (:mod:`contrastive.step.streamed.inputs`) reads the rows of one chunk of a step at a
    time from ``examples``, never the whole host batch.

    >>> t = train_examples("shapes", global_batch_size=8, seed=0)  # doctest: +SKIP
    >>> one = t.collate([t.examples[i] for i in range(8)])  # doctest: +SKIP
    >>> np.array_equal(one["text"], t.batches()[0]["text"])  # doctest: +SKIP
    True
    """

    examples: grain.MapDataset
    collate: Callable[[Sequence[Any]], Batch]
    global_batch_size: int
    process_index: int
    process_count: int
    # Own tokens: the batches read their examples by index in one go (see own_token_batch);
    # ``order`` is the shuffled index sequence both views share.
    order: grain.MapDataset | None = None
    read_batch: Callable[[np.ndarray], Batch] | None = None

    @property
    def host_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def batches(self) -> grain.MapDataset:
        """Element ``s``: this host's rows of global batch ``s`` (lazy: a host never builds
        the other hosts' rows)."""
        b, pi, pc = self.host_batch_size, self.process_index, self.process_count
        if self.order is not None:  # the same examples, read per batch
            return self.order.batch(b, drop_remainder=True)[pi::pc].map(self.read_batch)
        return self.examples.batch(b, drop_remainder=True, batch_fn=self.collate)[pi::pc]


def _stack(examples: Sequence[Batch]) -> Batch:
    """A list of examples (dicts of arrays) -> a dict of stacked arrays."""
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


def train_examples(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    tokenizer: HashTokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence | None = None,
) -> TrainExamples:
    """The training examples of ``name`` one at a time, in the order of the training batches.

    The one definition of the training order (see :class:`TrainExamples`);
    :func:`train_dataset` is ``train_examples(...).batches()``. Arguments as there.
    """
    spec = get_spec(name, image_size)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    host_batch_size(global_batch_size, pc)
    src = source if source is not None else load_source(name, split or spec.train_split, data_dir)
    if len(src) < global_batch_size:
        raise ValueError(
            f"dataset {name!r} has {len(src)} training examples, fewer than the batch of "
            f"{global_batch_size}: lower --batch-size"
        )
    sizes = dict(global_batch_size=global_batch_size, process_index=pi, process_count=pc)
    if spec.kind == "image_text" and spec.vocab_size is not None:  # own tokens
        # Grain shuffles (and for the batches, batches) indices; the examples are read
        # from the source by index, which spares grain's per-element bookkeeping on it.
        order = grain.MapDataset.range(len(src)).shuffle(seed=seed).repeat()
        if isinstance(src, TableSource):  # rows as they are, e.g. locked features
            collate = _stack
        else:
            collate = functools.partial(own_token_arrays, spec)
        examples = order.map(lambda i: src[int(i)])
        return TrainExamples(examples, collate, **sizes, order=order,
                             read_batch=own_token_batch(spec, src))  # fmt: skip
    # shuffle before repeat: grain reshuffles every epoch and never mixes two epochs' order.
    examples = grain.MapDataset.source(src).shuffle(seed=seed).repeat()
    if spec.kind == "image":
        examples = examples.random_map(two_views_transform(spec), seed=seed + 1)
    else:
        examples = examples.random_map(
            image_text_transform(spec, tokenizer or HashTokenizer()), seed=seed + 1
        )
    return TrainExamples(examples, _stack, **sizes)


def train_dataset(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    tokenizer: HashTokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence | None = None,
) -> grain.MapDataset:
    """Infinite random-access dataset of this host's training batches.

    One global order (:func:`train_examples`): the whole split is shuffled (a new order every
    epoch), augmented per global example index and cut into global batches of
    ``global_batch_size``; host ``process_index`` builds only its ``b`` consecutive rows of
    each global batch. So the global batch of a step is the same whatever the number of
    processes (a run on two hosts computes what one host would), and hosts never read the
    same example in a step. Element ``s`` is this host's part of the batch of step ``s``:

    - ``kind="image"``: ``view1, view2: float32[b, S, S, C]`` (two SimCLR views in [0, 1]),
      ``label: int32[b]``;
    - ``kind="image_text"``: ``image: float32[b, S, S, C]``, ``text: int32[b, L]``;
    - data sets with their own tokens (``spec.vocab_size`` set, e.g. ``shapes``): ``image``
      (no augmentation: the caption names the object's position, a crop would falsify it),
      ``text: int32[b, spec.text_len]`` and ``caption_id: int32[b]``; ``tokenizer`` is
      ignored; a :class:`TableSource` (e.g. locked image features) gives its rows as they
      are;

    with ``b = global_batch_size // process_count`` and ``S`` the spec's image size.
    """
    return train_examples(
        name,
        global_batch_size=global_batch_size,
        seed=seed,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        tokenizer=tokenizer,
        process_index=process_index,
        process_count=process_count,
        source=source,
    ).batches()


class BatchIterator:
    """Iterator over ``dataset[position], dataset[position + 1], ...`` with a saveable position.

    ``get_state()``/``set_state()`` are what the checkpoint stores: with a random-access
    pipeline, the position is the whole state. With ``prefetch`` the next batch is built in
    a background thread while the caller trains on the current one; batches are pure
    functions of their index, so this changes no value.
    """

    def __init__(self, dataset: grain.MapDataset, position: int = 0, *, prefetch: bool = True):
        self.dataset = dataset
        self.position = position
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._pending: tuple[int, Future] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def _fetch(self, index: int) -> Batch:
        if self._pending is not None and self._pending[0] == index:
            batch = self._pending[1].result()
        else:
            batch = self.dataset[index]
        self._pending = None
        if self._pool is not None:
            self._pending = (index + 1, self._pool.submit(self.dataset.__getitem__, index + 1))
        return batch

    def __next__(self) -> Batch:
        batch = self._fetch(self.position)
        self.position += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None


def eval_arrays(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    max_examples: int | None = None,
    tokenizer: HashTokenizer | None = None,
    source: Sequence | None = None,
) -> Batch:
    """The first ``max_examples`` of ``split`` as arrays, un-augmented, for evaluation.

    ``image: float32[N, S, S, C]`` plus ``label: int32[N]`` (labelled datasets) or
    ``text: int32[N, L]`` (first caption of each image). Data sets with their own tokens add
    ``caption_id: int32[N]`` (two examples may share one) and ``novel: bool[N]`` (a held-out
    attribute combination, never in ``train``); ``tokenizer`` is ignored for them.
    """
    spec = get_spec(name, image_size)
    src = source if source is not None else load_source(name, split, data_dir)
    n = len(src) if max_examples is None else min(len(src), max_examples)
    if spec.kind == "image_text" and spec.vocab_size is not None:
        examples = [src[i] for i in range(n)]
        out = own_token_arrays(spec, examples)
        out["novel"] = np.asarray([ex["novel"] for ex in examples], bool)
        return out
    images, labels, texts = [], [], []
    tok = tokenizer or HashTokenizer()
    for i in range(n):
        ex = src[i]
        images.append(eval_view(to_float(ex["image"]), spec.image_size))
        if spec.kind == "image":
            labels.append(ex["label"])
        else:
            texts.append(tok(first_caption(ex)))
    out = {"image": np.stack(images).astype(np.float32)}
    if spec.kind == "image":
        out["label"] = np.asarray(labels, np.int32)
    else:
        out["text"] = np.stack(texts)
    return out
