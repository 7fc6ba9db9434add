"""One example at a time: a data set's source, and the per-example transforms of training.

The one input seam of every way of drawing a batch: the grain pipeline
(:mod:`contrastive.data.pipeline`), the streamed cache and hard batches
(:mod:`contrastive.inputs.hard_batch_inputs`) all read examples with :func:`load_source` and
turn them into rows with the same transforms (:func:`two_views_transform`,
:func:`image_text_transform`, :func:`own_token_batch` for sets with their own tokens), so
that the same example with the same random stream gives the same row whichever way it is drawn.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from contrastive.data import captioned_shapes, own_pairs
from contrastive.data.augment import eval_view, random_resized_crop, simclr_view
from contrastive.data.digits import prepare_digits
from contrastive.data.specs import DATASETS, Batch, DatasetSpec, get_spec
from contrastive.data.text import HashTokenizer


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


def own_token_arrays(spec: DatasetSpec, examples: Sequence[dict[str, Any]]) -> Batch:
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
        return own_token_arrays(spec, [source[int(i)] for i in indices])

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
