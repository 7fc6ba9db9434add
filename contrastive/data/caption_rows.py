"""The rows of a captions file: read (CSV, TSV or JSON lines), then screened.

:func:`read_rows` gives ``(image path, caption)`` of every row of the file
:func:`contrastive.data.own_pairs.prepare` is given; :func:`screen_rows` parts them into the
rows worth decoding and the bad ones that cannot even be tried (empty caption, duplicate row,
missing file), each with its row number and why.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_rows", "screen_rows"]


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


def screen_rows(
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
