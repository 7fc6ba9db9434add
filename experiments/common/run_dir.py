"""Where experiment scripts write: a fresh run directory, never the tracked results.

Every script writes its outputs into ``--out`` (default: a new ``runs/<name>-<time>/``
under the current directory, which git ignores) and prints that path at the end. The
committed reference results in ``experiments/results/`` change only when a script is
given ``--update-results``, which copies the named files there after a successful run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from experiments.common.cli import output_dir, shared_module

# experiments/results/, beside the commands (this module lives in experiments/common/).
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
RUNS_ROOT = "runs"


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--update-results``, the same for every script."""
    parser.add_argument(
        "--out",
        type=output_dir,
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
        path = Path(os.path.expanduser(out))
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; pass a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = _why(e)
            raise ValueError(
                f"--out {path} cannot be created ({why}): pass a writable directory"
            ) from None
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
        except OSError as e:
            raise ValueError(
                f"cannot create a run directory under {root.resolve()} ({_why(e)}): pass --out DIR"
            ) from None
    raise RuntimeError(f"could not create a fresh run directory under {root}")


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def publish(run_dir: str | os.PathLike, names: Iterable[str], results_dir: Path = RESULTS_DIR):
    """Copy ``names`` from ``run_dir`` into ``results_dir`` (the ``--update-results`` step).

    A committed result must say what produced it: every JSON file among ``names`` needs a
    top-level ``"stack"`` (:func:`experiments.common.reports.stack_record`), checked before
    anything is copied, so that a result is never published without its versions and machine.
    """
    names = list(names)
    for name in names:
        if name.endswith(".json"):
            obj = json.loads((Path(run_dir) / name).read_text())
            if not (isinstance(obj, dict) and isinstance(obj.get("stack"), dict)):
                raise ValueError(
                    f"{name} records no 'stack' (the package versions and machine that made "
                    "it): add experiments.common.reports.stack_record() to its JSON before "
                    "publishing"
                )
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(Path(run_dir) / name, results_dir / name)


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
