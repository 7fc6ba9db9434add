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

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import captioned_shapes, own_pairs
from contrastive.data.augment import AugmentConfig, eval_view, random_resized_crop, simclr_view
from contrastive.data.digits import NAME as DIGITS_TFDS_NAME
from contrastive.data.digits import prepare_digits
from contrastive.data.text import HashTokenizer

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


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Sequence:
    """Random-access source of ``split``; prepares the offline digits on first use.

    ``shapes`` is generated (:class:`~contrastive.data.captioned_shapes.CaptionedShapes` with
    its default sizes and seed 0; ``data_dir`` is not used). Nothing is downloaded: a missing
    TFDS dataset is a ``ValueError`` saying how to fix it.
    """
    spec = get_spec(name)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if name not in DATASETS:  # own pairs: the run carves the test split (own_pairs.train_test)
        if split != spec.train_split:
            raise ValueError(
                f"dataset {name!r} has one split, {spec.train_split!r}: its test split is the "
                "last --eval-examples pairs (contrastive.data.own_pairs.train_test)"
            )
        return own_pairs.open_pairs(name)
    if name == "shapes":
        return captioned_shapes.CaptionedShapes(split)
    if name == "digits":
        return _readable(prepare_digits(data_dir).as_data_source(split=split), split)
    # TFDS logs a warning (through absl) for every folder it looks into before it gives up;
    # the one-line error below says all of it, so the warnings are held back meanwhile.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with _tfds_scratch():
            source = tfds.data_source(
                spec.tfds_name, split=split, data_dir=data_dir, download=False
            )
    except Exception as e:  # TFDS raises several types for "not there"; one message for all
        where = data_dir or "the default TFDS data dir"
        raise ValueError(
            f"dataset {name!r} ({spec.tfds_name}, split {split!r}) is not prepared in {where}: "
            f"prepare it with `tfds build {spec.tfds_name.split(':')[0]} --file_format="
            f"array_record --data_dir DIR` and pass --data-dir DIR, or use --dataset digits "
            f"(offline)"
        ) from e
    finally:
        absl.setLevel(level)
    return _readable(source, split)


@contextlib.contextmanager
def _tfds_scratch() -> Iterator[None]:
    """Point ``tempfile`` at a folder removed on exit while TFDS opens a data set.

    TFDS makes an empty ``tmp*tfds`` folder in the system temp dir each time it resolves a
    data set and never removes it; a long sweep would leave hundreds. What it reads lives
    in ``data_dir``, so nothing it keeps points into the scratch folder.
    """
    before = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="contrastive-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = before


FULL_CHECK_RECORDS = 20_000  # a split this small is read through once when it is opened


def _readable(source: Any, split: str) -> Any:
    """``source``, once its records read back: a truncated or corrupted data file is one line
    naming it here, before training starts, not a traceback mid-run.

    array_record files are riegeli files, whose blocks carry hashes that every read checks;
    a split of at most ``FULL_CHECK_RECORDS`` records (the offline digits: 1,438 records in
    0.2 s) is read through, so a flipped bit anywhere is found; a larger one only at its
    first and last records (a cut-off file), the rest when training reads it."""
    try:
        n = len(source)
        for i in range(n) if n <= FULL_CHECK_RECORDS else sorted({0, n - 1}) if n else ():
            source[i]
    except Exception as e:
        info = getattr(source, "dataset_info", None)
        files = (
            sorted(glob.glob(os.path.join(info.data_dir, f"{info.name}-{split}.*")))
            if info is not None
            else []
        )
        reason = " ".join(str(e).split())[:160]
        raise ValueError(
            f"the {split} data file {', '.join(files) or '(unknown)'} cannot be read ({reason}): "
            "it is truncated or corrupted; rebuild the data set (for digits: delete its folder)"
        ) from None
    return source


def to_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return image.astype(np.float32) / 255.0


def first_caption(example: dict[str, Any]) -> Any:
    return np.asarray(example["captions"]["text"]).reshape(-1)[0]


def two_views_transform(spec: DatasetSpec):
    def fn(example: dict[str, Any], rng: np.random.Generator) -> Batch:
        image = to_float(example["image"])
        return {
            "view1": simclr_view(image, rng, spec.augment),
            "view2": simclr_view(image, rng, spec.augment),
            "label": np.int32(example["label"]),
        }

    return fn


def image_text_transform(spec: DatasetSpec, tokenizer: HashTokenizer):
    a = spec.augment

    def fn(example: dict[str, Any], rng: np.random.Generator) -> Batch:
        image = to_float(example["image"])
        texts = np.asarray(example["captions"]["text"]).reshape(-1)
        caption = texts[rng.integers(len(texts))] if len(texts) else ""
        view = random_resized_crop(image, rng, a.image_size, a.crop_scale, a.crop_ratio)
        return {"image": view.astype(np.float32), "text": tokenizer(caption)}

    return fn


_OWN_TOKEN_KEYS = ("image", "text", "caption_id")


def _own_token_arrays(spec: DatasetSpec, examples: Sequence[dict[str, Any]]) -> Batch:
    """Stack examples with their own tokens: ``uint8`` images -> ``float32`` in [0, 1] at the
    spec's size, converted once per batch; no augmentation."""
    batch = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in _OWN_TOKEN_KEYS}
    image = batch["image"].astype(np.float32) / 255.0
    if image.shape[1:3] != (spec.image_size, spec.image_size):
        image = np.stack([eval_view(im, spec.image_size) for im in image])
    return {
        "image": image,
        "text": batch["text"].astype(np.int32),
        "caption_id": batch["caption_id"].astype(np.int32),
    }


def own_token_batch(spec: DatasetSpec, source: Sequence):
    """Indices ``int[b]`` -> the batch of a source with its own tokens.

    Grain handles only the indices (sharding, shuffling, batching); the examples are read
    here, which spares grain's per-element bookkeeping on the source (a third of the time
    of a generated batch). A :class:`TableSource` gives its rows at once, as they are.
    """

    def fn(indices: np.ndarray) -> Batch:
        if isinstance(source, TableSource):
            return source.rows(np.asarray(indices))
        return _own_token_arrays(spec, [source[int(i)] for i in indices])

    return fn


class TableSource:
    """Equal-length arrays as a random-access source: ``src[i]`` is the dict of row ``i``,
    ``src.rows(idx)`` the dict of the rows at ``idx`` (one gather per array).

    What a run on precomputed inputs reads, e.g. a locked image tower's features beside the
    caption tokens and ids: ``TableSource(image=features, text=tokens, caption_id=ids)``.
    """

    def __init__(self, **arrays: np.ndarray):
        lengths = {k: len(v) for k, v in arrays.items()}
        if not arrays or len(set(lengths.values())) != 1:
            raise ValueError(f"a table needs arrays of one length, got {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def rows(self, indices: np.ndarray) -> Batch:
        return {k: v[indices] for k, v in self.arrays.items()}


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
            collate = functools.partial(_own_token_arrays, spec)
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
        out = _own_token_arrays(spec, examples)
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
