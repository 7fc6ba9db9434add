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

The captions file is read and screened by :mod:`contrastive.data.caption_rows`.

Reading is :mod:`contrastive.data.prepared_pairs` (its names are handed on here):
``--dataset DIR`` (``get_spec``/``load_source`` of :mod:`contrastive.data.pipeline`) gives
the pairs as image-text examples (``{"image": uint8[S, S, 3], "captions": {"text":
[caption]}}``, the form of ``coco_captions``), so training goes through the same grain
pipeline; a run holds out the last ``--eval-examples`` pairs (in file order) as its test
split (:func:`train_test`) and reports image-to-text and text-to-image recall@1/5/10.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.data.caption_rows import read_rows, screen_rows
from contrastive.data.prepared_pairs import (
    FORMAT,
    SPEC_FILE,
    VERSION,
    PairsSource,
    data_digest,
    decode_record,
    encode_record,
    is_prepared,
    open_pairs,
    read_spec,
    sha256_file,
    train_test,
)

# The reading side is contrastive.data.prepared_pairs; its names are handed on here, where
# the pipeline and the commands have always found them.
__all__ = [
    "BAD_KINDS",
    "BAD_ROWS_FILE",
    "FORMAT",
    "SPEC_FILE",
    "VERSION",
    "PairsSource",
    "decode_record",
    "encode_record",
    "is_prepared",
    "open_pairs",
    "prepare",
    "read_rows",
    "read_spec",
    "summary_line",
    "train_test",
]

BAD_ROWS_FILE = "bad_rows.tsv"
BAD_KINDS = ("missing file", "unreadable image", "empty caption", "duplicate row")
_SETTINGS_FILE = "settings.json"


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
        "sha256": sha256_file(final),
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
    good, bad = screen_rows(rows, images)
    if strict and bad:  # before any image is decoded
        raise ValueError(_strict_message(bad, len(rows)))
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "captions_sha256": sha256_file(captions),
        "images_dir": os.path.abspath(images),
        "image_size": image_size,
        "image_column": image_column,
        "caption_column": caption_column,
        "shard_size": shard_size,
    }
    partial = _open_partial(target, settings)
    markers = _write_shards(good, partial, settings, workers, progress)

    unreadable = [[r, p, "unreadable image", why] for k in sorted(markers)
                  for r, p, why in markers[k]["unreadable"]]  # fmt: skip
    bad = sorted(bad + unreadable, key=lambda b: b[0])
    kept = sum(m["count"] for m in markers.values())
    line = summary_line(Counter(b[2] for b in bad), len(rows), kept)
    if strict and bad:
        raise ValueError(_strict_message(bad, len(rows)))
    if kept == 0:
        raise ValueError(f"--captions {captions}: no usable pair ({line})")
    spec = _spec(partial, settings, markers, bad, rows_read=len(rows), captions=captions)
    for name in os.listdir(partial):  # markers and settings: the spec now says it all
        if name.endswith(".done.json") or name == _SETTINGS_FILE:
            (partial / name).unlink()
    _write_json(partial / SPEC_FILE, spec)
    if target.exists():
        target.rmdir()  # empty (checked above)
    os.rename(partial, target)  # the one step that makes the data set appear, complete
    return spec


def _open_partial(target: Path, settings: dict[str, Any]) -> Path:
    """``target.partial``: made with ``settings`` written in it, or an unfinished one of an
    earlier run with the same settings (to resume); ValueError for one with other settings."""
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
    return partial


def _write_shards(
    good: list[tuple[int, str, str]],
    partial: Path,
    settings: dict[str, Any],
    workers: int | None,
    progress: bool,
) -> dict[int, dict]:
    """Every shard's marker, by shard: those an earlier, stopped run finished, read back; the
    others written now (:func:`_run_tasks`)."""
    shard_size = settings["shard_size"]
    chunks = [good[i : i + shard_size] for i in range(0, len(good), shard_size)]
    markers: dict[int, dict] = {}
    for k in range(len(chunks)):  # resume: shards finished by an earlier, stopped run
        done = partial / (_shard_name(k) + ".done.json")
        if done.exists() and (partial / _shard_name(k)).exists():
            markers[k] = json.loads(done.read_text())
    tasks = [
        _Task(k, chunk, settings["images_dir"], settings["image_size"], str(partial))
        for k, chunk in enumerate(chunks)
        if k not in markers
    ]
    _run_tasks(tasks, markers, workers, progress, total=len(good), done=len(good) - sum(
        len(t.rows) for t in tasks))  # fmt: skip
    return markers


def _spec(
    partial: Path,
    settings: dict[str, Any],
    markers: dict[int, dict],
    bad: list[list[Any]],
    *,
    rows_read: int,
    captions: str,
) -> dict[str, Any]:
    """The spec of the finished shards; writes ``bad_rows.tsv`` and drops empty shards."""
    counts = Counter(b[2] for b in bad)
    kept = sum(m["count"] for m in markers.values())
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
    return {
        **{k: settings[k] for k in ("format", "version", "image_size", "image_column")},
        "caption_column": settings["caption_column"],
        "channels": 3,
        "count": kept,
        "rows_read": rows_read,
        "bad_rows": {k: counts.get(k, 0) for k in BAD_KINDS},
        "captions_file": os.path.abspath(captions),
        "images_dir": settings["images_dir"],
        "inputs_sha256": inputs.hexdigest(),
        "data_sha256": data_digest(shards),
        "shards": shards,
        "summary": summary_line(counts, rows_read, kept),
    }


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
