"""A user's own image-text pairs: prepared once into ArrayRecord shards, read as a data set.

A folder of images and a file of captions (CSV, TSV or JSON lines, one row per pair: an image
path relative to the images folder, and its caption; the form open_clip reads, as CLIP was
trained: Radford et al. 2021) becomes, with :func:`prepare` (the command
``python -m experiments.prepare_pairs``), a directory of:

- ``shard-00000.array_record`` ...: one record per good pair, the image decoded once,
  centre-cropped to a square and resized to ``image_size`` (Pillow, bicubic), stored as raw
  ``uint8 [S, S, 3]`` pixels after its UTF-8 caption (:func:`encode_record`); captions are
  kept as text (a run tokenizes them);
- ``pairs.json`` (:data:`SPEC_FILE`): count, image size, the columns read, each shard's
  count and sha256, ``data_sha256`` over the shards (checked whenever the set is opened),
  ``inputs_sha256`` over the caption file, the images read and the settings;
- ``bad_rows.tsv``: every row left out and why: ``missing file``, ``unreadable image``,
  ``empty caption`` or ``duplicate row`` (the same image and caption as an earlier row).

Preparation runs in worker processes, one shard per task, behind a progress bar. It writes
into ``OUT.partial/`` (each shard to a temporary name, renamed when complete, then a marker
file), so a killed preparation resumes where it stopped when rerun with the same flags,
and only the last step renames ``OUT.partial`` to ``OUT``: a directory named ``OUT`` with
``pairs.json`` is always complete.

Reading: ``--dataset DIR`` (``get_spec``/``load_source`` of :mod:`contrastive.data.pipeline`)
gives the pairs as image-text examples (``{"image": uint8[S, S, 3], "captions": {"text":
[caption]}}``, the form of ``coco_captions``), so training goes through the same grain
pipeline; a run holds out the last ``--eval-examples`` pairs (in file order) as its test
split (:func:`train_test`) and reports image-to-text and text-to-image recall@1/5/10.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.data.sources import Subrange

SPEC_FILE = "pairs.json"
BAD_ROWS_FILE = "bad_rows.tsv"
FORMAT = "contrastive-own-pairs"
VERSION = 1
BAD_KINDS = ("missing file", "unreadable image", "empty caption", "duplicate row")
_SETTINGS_FILE = "settings.json"


# ------------------------------------------------------------------------- records


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


# ------------------------------------------------------------------------- reading rows


def _format(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext in (".tsv", ".tab"):
        return "tsv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "csv"


def read_rows(path: str, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    """(image path, caption) of every row of a CSV, TSV (by the ``.tsv`` extension) or JSON
    lines (``.jsonl``/``.json``) file with a header row (CSV/TSV) or one object per line.
    A missing value reads as ``""``. ValueError (one line) for a missing column."""
    fmt = _format(path)
    rows: list[dict[str, Any]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if fmt == "jsonl":
                for k, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f"--captions {path}: line {k} is not JSON ({e.msg})"
                        ) from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"--captions {path}: line {k} is not a JSON object")
                    rows.append(obj)
                columns = set().union(*(r.keys() for r in rows)) if rows else set()
            else:
                reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
                rows = list(reader)
                columns = set(reader.fieldnames or ())
    except UnicodeDecodeError as e:
        raise ValueError(f"--captions {path}: not UTF-8 text ({e.reason})") from None
    flags = (("--image-column", image_column), ("--caption-column", caption_column))
    # A CSV/TSV header names its columns even with no rows below it.
    missing = [f"{col!r} ({flag})" for flag, col in flags if columns and col not in columns]
    if missing:
        raise ValueError(
            f"--captions {path} has no column {' nor '.join(missing)}; it has "
            f"{', '.join(sorted(map(str, columns)))}: name the right ones with those flags"
        )
    if not rows:
        raise ValueError(f"--captions {path} holds no rows")

    def text(v: Any) -> str:
        return "" if v is None else str(v)

    return [(text(r.get(image_column)), text(r.get(caption_column))) for r in rows]


def _sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------- preparing


@dataclasses.dataclass(frozen=True)
class _Task:
    shard: int
    rows: list[tuple[int, str, str]]  # (row number, image path, caption)
    images: str
    image_size: int
    partial: str


def _load_image(path: str, size: int) -> tuple[np.ndarray, bytes]:
    """The file's pixels centre-cropped to a square and resized to ``size`` (RGB, bicubic),
    and the file's bytes."""
    from PIL import Image, ImageOps

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, np.uint8), data


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.array_record"


def _write_shard(task: _Task) -> dict[str, Any]:
    """Decode, resize and write one shard; returns (and writes) its marker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    partial = Path(task.partial)
    final = partial / _shard_name(task.shard)
    tmp = partial / (final.name + ".tmp")
    inputs = hashlib.sha256()
    unreadable, count = [], 0
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for row, rel, caption in task.rows:
            try:
                pixels, data = _load_image(os.path.join(task.images, rel), task.image_size)
            except Exception as e:  # Pillow raises many types for a broken file
                unreadable.append([row, rel, f"{type(e).__name__}: {e}".splitlines()[0][:200]])
                continue
            # Why hash the bytes and the row: the data set's identity covers what was read.
            inputs.update(hashlib.sha256(data).digest() + f"{row}\t{rel}\t{caption}".encode())
            writer.write(encode_record(pixels, caption))
            count += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    marker = {
        "shard": task.shard,
        "file": final.name,
        "count": count,
        "sha256": _sha256_file(final),
        "inputs_sha256": inputs.hexdigest(),
        "unreadable": unreadable,
        "first_row": task.rows[0][0],
        "last_row": task.rows[-1][0],
    }
    _write_json(partial / (final.name + ".done.json"), marker)
    return marker


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _screen(
    rows: Sequence[tuple[str, str]], images: str
) -> tuple[list[tuple[int, str, str]], list[list[Any]]]:
    """Rows that can be decoded, and the rows that cannot even be tried (missing file, empty
    caption, duplicate row) as ``[row, path, kind, detail]``; rows count from 1 (the first
    row after a CSV/TSV header, the first object of a JSON lines file)."""
    good, bad, seen = [], [], {}
    for row, (rel, caption) in enumerate(rows, 1):
        key = (rel, caption.strip())
        if not caption.strip():
            bad.append([row, rel, "empty caption", ""])
        elif key in seen:
            bad.append([row, rel, "duplicate row", f"same image and caption as row {seen[key]}"])
        elif not rel or not os.path.isfile(os.path.join(images, rel)):
            bad.append([row, rel, "missing file", f"no file {os.path.join(images, rel)}"])
        else:
            seen[key] = row
            good.append((row, rel, caption.strip()))
    return good, bad


def summary_line(counts: dict[str, int], total: int, kept: int) -> str:
    """``"kept 290 of 300 rows; bad: 4 missing file, 3 unreadable image, ..."``."""
    bad = ", ".join(f"{counts[k]} {k}" for k in BAD_KINDS if counts.get(k))
    return f"kept {kept} of {total} rows; bad: {bad or 'none'}"


def _strict_message(bad: list[list[Any]], total: int) -> str:
    counts = Counter(b[2] for b in bad)
    kinds = ", ".join(f"{counts[k]} {k}" for k in BAD_KINDS if counts.get(k))
    row, path, kind, _ = bad[0]
    return (
        f"--strict: {len(bad)} of {total} rows are bad ({kinds}; first: row {row}, {kind}, "
        f"{path!r}): fix them or drop --strict"
    )


def prepare(
    captions: str,
    images: str,
    out: str,
    *,
    image_size: int = 64,
    image_column: str = "image",
    caption_column: str = "caption",
    shard_size: int = 1000,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the pairs of ``captions`` (images under ``images``) into ``out``; returns the
    spec written to ``out/pairs.json``. See the module docstring for the layout.

    ValueError (one line, naming the flag) for bad arguments, an ``out`` that exists and is
    not empty, an unfinished ``out.partial`` prepared with other settings, and (``strict``)
    any bad row: missing files, empty captions and duplicates before any image is decoded,
    unreadable images once all are decoded (``out`` is then not written).
    """
    if image_size < 4:
        raise ValueError(f"--image-size must be at least 4, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if not os.path.isfile(captions):
        raise ValueError(f"--captions {captions}: no such file")
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: not a directory")
    target = Path(out).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target} exists and is not empty: remove it or pass a new path")
    rows = read_rows(captions, image_column, caption_column)
    good, bad = _screen(rows, images)
    if strict and bad:  # before any image is decoded
        raise ValueError(_strict_message(bad, len(rows)))
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "captions_sha256": _sha256_file(captions),
        "images_dir": os.path.abspath(images),
        "image_size": image_size,
        "image_column": image_column,
        "caption_column": caption_column,
        "shard_size": shard_size,
    }
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        try:
            before = json.loads((partial / _SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            before = None
        if before != settings:
            raise ValueError(
                f"{partial} holds an unfinished preparation with other inputs or flags: rerun "
                "with those, or delete it to start afresh"
            )
    else:
        partial.mkdir(parents=True)
        _write_json(partial / _SETTINGS_FILE, settings)

    chunks = [good[i : i + shard_size] for i in range(0, len(good), shard_size)]
    markers: dict[int, dict] = {}
    for k in range(len(chunks)):  # resume: shards finished by an earlier, stopped run
        done = partial / (_shard_name(k) + ".done.json")
        if done.exists() and (partial / _shard_name(k)).exists():
            markers[k] = json.loads(done.read_text())
    tasks = [
        _Task(k, chunk, os.path.abspath(images), image_size, str(partial))
        for k, chunk in enumerate(chunks)
        if k not in markers
    ]
    _run_tasks(tasks, markers, workers, progress, total=len(good), done=len(good) - sum(
        len(t.rows) for t in tasks))  # fmt: skip

    unreadable = [[r, p, "unreadable image", why] for k in sorted(markers)
                  for r, p, why in markers[k]["unreadable"]]  # fmt: skip
    bad = sorted(bad + unreadable, key=lambda b: b[0])
    counts = Counter(b[2] for b in bad)
    kept = sum(m["count"] for m in markers.values())
    line = summary_line(counts, len(rows), kept)
    if strict and bad:
        raise ValueError(_strict_message(bad, len(rows)))
    if kept == 0:
        raise ValueError(f"--captions {captions}: no usable pair ({line})")
    with open(partial / BAD_ROWS_FILE, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["row", "image", "problem", "detail"])
        w.writerows(bad)
    shards = [{k: markers[i][k] for k in ("file", "count", "sha256")} for i in sorted(markers)]
    shards = [s for s in shards if s["count"]]
    for i in sorted(markers):  # an empty shard (every image unreadable) is not kept
        if not markers[i]["count"]:
            (partial / markers[i]["file"]).unlink()
    inputs = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for i in sorted(markers):
        inputs.update(markers[i]["inputs_sha256"].encode())
    spec = {
        **{k: settings[k] for k in ("format", "version", "image_size", "image_column")},
        "caption_column": caption_column,
        "channels": 3,
        "count": kept,
        "rows_read": len(rows),
        "bad_rows": {k: counts.get(k, 0) for k in BAD_KINDS},
        "captions_file": os.path.abspath(captions),
        "images_dir": settings["images_dir"],
        "inputs_sha256": inputs.hexdigest(),
        "data_sha256": _data_digest(shards),
        "shards": shards,
        "summary": line,
    }
    for name in os.listdir(partial):  # markers and settings: the spec now says it all
        if name.endswith(".done.json") or name == _SETTINGS_FILE:
            (partial / name).unlink()
    _write_json(partial / SPEC_FILE, spec)
    if target.exists():
        target.rmdir()  # empty (checked above)
    os.rename(partial, target)  # the one step that makes the data set appear, complete
    return spec


def _run_tasks(
    tasks: list[_Task], markers: dict, workers: int | None, progress: bool, *, total: int,
    done: int,
) -> None:  # fmt: skip
    """Every task in worker processes (or here, with one worker), a bar counting rows."""
    from tqdm import tqdm

    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    bar = tqdm(total=total, initial=done, unit="pair", disable=not progress, desc="prepare")
    try:
        if workers == 1:
            for t in tasks:
                markers[t.shard] = _write_shard(t)
                bar.update(len(t.rows))
            return
        import multiprocessing as mp

        # fork: the workers need no re-import (nothing here starts jax's backend or threads)
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers) as pool:
            sizes = {t.shard: len(t.rows) for t in tasks}
            for m in pool.imap_unordered(_write_shard, tasks):
                markers[m["shard"]] = m
                bar.update(sizes[m["shard"]])
    finally:
        bar.close()


def _data_digest(shards: Sequence[dict]) -> str:
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
    if _data_digest(spec["shards"]) != spec.get("data_sha256"):
        raise ValueError(
            f"--dataset {directory}: {SPEC_FILE}'s data_sha256 does not match its shards: "
            "prepare the data set again"
        )
    for s in spec["shards"]:
        if _sha256_file(os.path.join(directory, s["file"])) != s["sha256"]:
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
