"""Where experiment scripts write: a fresh run directory, never the tracked results.

Every script writes its outputs into ``--out`` (default: a new ``runs/<name>-<time>/``
under the current directory, which git ignores) and prints that path at the end. The
committed reference results in ``experiments/results/`` change only when a script is
given ``--update-results``, which copies the named files there after a successful run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_ROOT = "runs"


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--update-results``, the same for every script."""
    parser.add_argument(
        "--out",
        default=None,
        help="directory for this run's outputs (default: a new runs/<script>-<time>/)",
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="also copy the outputs into experiments/results/ (the committed reference)",
    )


def create(name: str, out: str | os.PathLike | None = None) -> Path:
    """The run directory: ``out`` (created if needed), or a new ``runs/<name>-<time>[-k]``."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; pass a directory")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(RUNS_ROOT)
    for k in range(1000):
        path = root / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {root}")


def publish(run_dir: str | os.PathLike, names: Iterable[str], results_dir: Path = RESULTS_DIR):
    """Copy ``names`` from ``run_dir`` into ``results_dir`` (the ``--update-results`` step)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(Path(run_dir) / name, results_dir / name)
