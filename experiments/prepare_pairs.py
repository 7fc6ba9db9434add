"""Prepare your own image-text pairs for training: ``python -m experiments.prepare_pairs``.

Reads a CSV, TSV (``.tsv``) or JSON lines (``.jsonl``) file of image path (relative to
``--images``) and caption, decodes each image once, centre-crops and resizes it to
``--image-size`` (Pillow), and writes ArrayRecord shards plus ``pairs.json`` (count, image
size, columns, sha256 of the inputs and of the shards) and ``bad_rows.tsv`` into ``--out``
(:mod:`contrastive.data.own_pairs`). Worker processes, a progress bar; a stopped
preparation resumes when rerun with the same flags, and ``--out`` appears only when
complete. Rows with a missing or unreadable image, an empty caption, or the same image
and caption as an earlier row are left out, counted in one summary line and listed in
``bad_rows.tsv``; ``--strict`` makes any of them an error.

    python -m experiments.prepare_pairs --captions pairs.csv --images photos/ --out data/pairs
    python -m experiments.train --dataset data/pairs --eval-examples 1000 --workdir runs/own

Prints the summary line and the directory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments.common.cli import (
    command_parser,
    directory,
    existing_file,
    positive_int,
    run_main,
)


def _parse(argv: Sequence[str] | None):
    p = command_parser("python -m experiments.prepare_pairs", __doc__)
    p.add_argument("--captions", type=existing_file, required=True,
                   help="CSV, TSV (.tsv) or JSON lines (.jsonl): image path, caption")  # fmt: skip
    p.add_argument("--images", type=directory, required=True,
                   help="directory the image paths are relative to")  # fmt: skip
    p.add_argument("--out", type=directory, required=True,
                   help="new directory for the prepared data set")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, default=64,
                   help="side of the square images stored (centre crop, then resize)")  # fmt: skip
    p.add_argument("--image-column", default="image", help="column of the image paths")
    p.add_argument("--caption-column", default="caption", help="column of the captions")
    p.add_argument("--shard-size", type=positive_int, default=1000,
                   help="rows per shard (and per worker task)")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (default: one per CPU core)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="any bad row is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    from contrastive.data import own_pairs

    spec = own_pairs.prepare(
        args.captions,
        args.images,
        args.out,
        image_size=args.image_size,
        image_column=args.image_column,
        caption_column=args.caption_column,
        shard_size=args.shard_size,
        workers=args.workers,
        strict=args.strict,
        progress=not args.no_progress,
    )
    bad = sum(spec["bad_rows"].values())
    listed = f" (listed in {args.out}/{own_pairs.BAD_ROWS_FILE})" if bad else ""
    print(f"{spec['summary']}{listed}")
    print(f"prepared {spec['count']} pairs in {len(spec['shards'])} shards: {args.out}")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
