"""A prepared set of a user's own image-text pairs, as a run reads it.

:func:`contrastive.data.own_pairs.prepare` writes a directory of ArrayRecord shards and a
spec, ``pairs.json`` (:data:`SPEC_FILE`); this module is everything that reads one:

- the record format, :func:`encode_record` / :func:`decode_record` (the caption's length,
  its UTF-8 bytes, then the ``uint8 [S, S, 3]`` pixels);
- :func:`is_prepared` and :func:`read_spec` (format and version checked);
- :func:`open_pairs`: the shards checked against the spec's sha256s (once per process, while
  their sizes and times stay the same), then :class:`PairsSource`, random access to the
  pairs; :func:`train_test` splits it into training and held-out pairs;
- the digests the preparation writes and the reading checks: :func:`sha256_file`,
  :func:`data_digest`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.data.sources import Subrange

SPEC_FILE = "pairs.json"
FORMAT = "contrastive-own-pairs"
VERSION = 1


def encode_record(image: np.ndarray, caption: str) -> bytes:
    """One pair as bytes: caption length (uint32, little-endian), UTF-8 caption, then the
    ``uint8 [S, S, 3]`` pixels row-major."""
    text = caption.encode("utf-8")
    return struct.pack("<I", len(text)) + text + np.ascontiguousarray(image, np.uint8).tobytes()


def decode_record(raw: bytes, image_size: int) -> dict[str, Any]:
    """Bytes of :func:`encode_record` -> ``{"image": uint8[S, S, 3], "captions": {"text":
    array([caption])}}`` (the example form of ``coco_captions``)."""
    (n,) = struct.unpack_from("<I", raw)
    caption = raw[4 : 4 + n].decode("utf-8")
    pixels = np.frombuffer(raw, np.uint8, offset=4 + n)
    if pixels.size != image_size * image_size * 3:
        raise ValueError(
            f"a record holds {pixels.size} pixel bytes, not {image_size}x{image_size}x3"
        )
    return {
        "image": pixels.reshape(image_size, image_size, 3),
        "captions": {"text": np.asarray([caption])},
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_digest(shards: Sequence[dict]) -> str:
    """``data_sha256`` of a spec: the sha256 over its shards' sha256s, in order."""
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


# ------------------------------------------------------------------------- reading


def is_prepared(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a directory written by :func:`prepare` (it holds ``pairs.json``)."""
    return os.path.isfile(os.path.join(os.path.expanduser(os.fspath(name)), SPEC_FILE))


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``pairs.json`` of a prepared directory; ValueError (one line) if it is not one."""
    path = os.path.join(os.path.expanduser(os.fspath(directory)), SPEC_FILE)
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--dataset {directory}: no readable {SPEC_FILE} ({type(e).__name__}); prepare "
            "it with python -m experiments.prepare_pairs"
        ) from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"--dataset {directory}: {SPEC_FILE} is not a prepared pairs spec")
    if spec.get("version") != VERSION:
        raise ValueError(
            f"--dataset {directory}: prepared with format version {spec.get('version')}, this "
            f"library reads {VERSION}: prepare it again"
        )
    return spec


class PairsSource:
    """Random access to the pairs of a prepared directory: ``src[i]`` is pair ``i`` (in the
    caption file's order, bad rows left out) as ``{"image", "captions"}``."""

    def __init__(self, directory: str | os.PathLike, spec: dict[str, Any]):
        from array_record.python import array_record_data_source

        self.directory, self.spec = os.fspath(directory), spec
        self.image_size = int(spec["image_size"])
        paths = [os.path.join(self.directory, s["file"]) for s in spec["shards"]]
        self._source = array_record_data_source.ArrayRecordDataSource(paths)
        if len(self._source) != spec["count"]:
            raise ValueError(
                f"--dataset {directory}: {len(self._source)} records, the spec says "
                f"{spec['count']}: prepare it again"
            )

    def __len__(self) -> int:
        return int(self.spec["count"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        return decode_record(self._source[int(index)], self.image_size)

    def __repr__(self) -> str:
        return f"PairsSource({self.directory!r}, {len(self)} pairs)"


def open_pairs(directory: str | os.PathLike) -> PairsSource:
    """The prepared pairs of ``directory``, once every shard matches the sha256 in its spec
    (and ``data_sha256`` the shards): a changed, truncated or swapped file is one line here,
    before training starts. The check reads every shard once per process."""
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    spec = read_spec(directory)
    stamps = tuple(
        (s["file"], _stamp(os.path.join(directory, s["file"]), directory)) for s in spec["shards"]
    )
    _verify(directory, json.dumps(spec, sort_keys=True), stamps)
    return PairsSource(directory, spec)


def _stamp(path: str, directory: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        raise ValueError(
            f"--dataset {directory}: shard {os.path.basename(path)} is missing: prepare the "
            "data set again"
        ) from None
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _verify(directory: str, spec_text: str, stamps: tuple) -> None:
    # Cached by the files' sizes and times: a run opens its data set more than once.
    spec = json.loads(spec_text)
    if data_digest(spec["shards"]) != spec.get("data_sha256"):
        raise ValueError(
            f"--dataset {directory}: {SPEC_FILE}'s data_sha256 does not match its shards: "
            "prepare the data set again"
        )
    for s in spec["shards"]:
        if sha256_file(os.path.join(directory, s["file"])) != s["sha256"]:
            raise ValueError(
                f"--dataset {directory}: shard {s['file']} does not match its sha256 in "
                f"{SPEC_FILE} (changed or corrupted): prepare the data set again"
            )


def train_test(directory: str | os.PathLike, eval_examples: int) -> tuple[Any, Any]:
    """(training pairs, held-out pairs): the last ``eval_examples`` pairs are the test split
    (``--eval-examples``), never trained on; the rest train."""
    source = open_pairs(directory)
    n = len(source)
    if not 1 <= eval_examples < n:
        raise ValueError(
            f"--eval-examples {eval_examples} must leave training pairs of the {n} in "
            f"{directory}: pass a number between 1 and {n - 1} (e.g. {max(1, n // 10)})"
        )
    return Subrange(source, 0, n - eval_examples), Subrange(source, n - eval_examples, n)
