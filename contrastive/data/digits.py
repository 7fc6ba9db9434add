"""The offline default dataset: scikit-learn's handwritten digits as a TFDS builder.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 images (values 0-16) of the digits
0-9 inside the scikit-learn wheel, so preparing this dataset downloads nothing. The images
are upsampled to 16x16 (bilinear) so that random crops keep some detail, scaled to uint8
and split 80/20 into ``train`` (1438) and ``test`` (359) with a fixed permutation.

Written in ``array_record`` format without TensorFlow: TFDS only needs TensorFlow to
*encode* ``Image`` features (PNG/JPEG) and to write TFRecords, so the image is stored as a
raw ``Tensor`` feature and the builder is constructed with ``file_format="array_record"``.

Building is quiet and leaves nothing behind: TFDS's "Downloading and preparing dataset"
banner (nothing is downloaded), its "Variant folder ... has no dataset_info.json" warning
(asked before the first build) and its look-up of hosted metadata (which leaves an empty
``tmp*tfds`` folder in the temporary directory) are all skipped for this builder.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils

from contrastive.data.augment import resize_bilinear

log = logging.getLogger(__name__)

NAME = "sklearn_digits"
IMAGE_SIZE = 16
_SPLIT_SEED = 0
_TRAIN_FRACTION = 0.8


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8[1438, 16, 16, 1], int64[1438]), "test": (uint8[359, ...], ...)}``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32)[..., None] / 16.0  # (N, 8, 8, 1) in [0, 1]
    images = np.stack([resize_bilinear(im, IMAGE_SIZE) for im in images])
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    n_train = int(round(_TRAIN_FRACTION * len(labels)))
    tr, te = order[:n_train], order[n_train:]
    return {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}


class _OfflineInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a data set that exists only locally.

    TFDS's builder calls ``initialize_from_bucket`` whenever the data set is not prepared
    yet: it makes a ``tempfile.mkdtemp("tfds")`` folder (never removed) before asking the
    public bucket for precomputed metadata. Nothing of this data set is hosted anywhere.
    """

    def initialize_from_bucket(self) -> None:
        return


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """Handwritten digits (UCI optdigits via scikit-learn), 16x16x1 uint8, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 8x8 digits upsampled to 16x16."}

    # TFDS finds a builder's files (checksums, metadata) from its top-level package, which
    # fails while `contrastive` is a namespace package; point it at this file directly.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _OfflineInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image encodes to PNG with TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        arrays = digits_arrays()
        return {split: self._generate_examples(*arrays[split]) for split in arrays}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}

    # TFDS prints these two banners to stdout around every build; here nothing is
    # downloaded and the build takes a second, so they go to the debug log instead.
    def _log_download_bytes(self) -> None:
        log.debug("preparing %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        log.debug("prepared %s in %s", self.name, self.data_dir)

    def is_prepared(self) -> bool:
        """Whether the data set is on disk (TFDS's own check warns when it is not)."""
        return _prepared(self)


def _prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # What TFDS's `is_prepared` checks for a builder of a valid version, without its
    # "Variant folder ... has no dataset_info.json" warning before the first build.
    return os.path.isfile(os.path.join(os.fspath(builder.data_path), "dataset_info.json"))


def prepare_digits(data_dir: str | os.PathLike | None = None) -> SklearnDigits:
    """Build ``sklearn_digits`` into ``data_dir`` (array_record) unless it is there already.

    Takes about a second. TFDS writes into an ``incomplete.*`` folder and renames it at the
    end, so a process killed half-way leaves no half-written dataset behind.
    """
    builder = SklearnDigits(
        data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record"
    )
    if not builder.is_prepared():
        # A second of work: TFDS's progress bars would only clutter the training output.
        was_active = tqdm_utils._active
        tfds.display_progress_bar(False)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
        except FileExistsError:
            # Another process (a second host on a shared data dir) renamed its finished copy
            # into place first: use that one.
            builder = SklearnDigits(data_dir=builder.data_dir_root, file_format="array_record")
            if not builder.is_prepared():
                raise
        finally:
            tfds.display_progress_bar(was_active)
    return builder
