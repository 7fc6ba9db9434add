"""Write the lock of exact versions: ``python -m experiments.lock_stack [--python PYTHON ...]``.

For each Python interpreter given (default: this one), in a fresh temporary virtual
environment of it, pip resolves ``.[test]`` (the ``test`` extra includes ``train``) without
installing anything (``pip install --dry-run --ignore-installed --report``), and every
package it would install, this project left out, is written as ``name==version`` into
``requirements/test-py3XY.txt``, with a header saying how it was made. The README's install
uses it as a constraints file, so a fresh install gets exactly these versions::

    .venv/bin/pip install -c requirements/test-py311.txt -e ".[test]"

One file serves both extras (``-c`` constrains only what an install needs). The lock is for
the platform it was made on (Linux x86-64, CPU jax); rerun this command to refresh it.
Left alone, pip picks the newest versions each Python supports (jax 0.12 needs Python
3.12): ``--like`` holds another Python's lock to the versions of the first, so that both
run the same stack::

    python -m experiments.lock_stack --python ~/.pyenv/versions/3.11.7/bin/python
    python -m experiments.lock_stack --python ~/.pyenv/versions/3.12.1/bin/python \\
        --like requirements/test-py311.txt
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from experiments.common.cli import command_parser, existing_file, run_main

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "requirements"
PROJECT = "contrastive-jax"


def _run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"{' '.join(cmd[:3])} ... failed: {tail}")
    return done.stdout


def resolve(
    python: str, extra: str = "test", like: str | None = None
) -> tuple[str, list[tuple[str, str]]]:
    """(Python version, sorted (name, version) pairs) that pip resolves for ``.[extra]``
    with ``python``, in a fresh virtual environment, installing nothing; ``like``: a lock
    file whose versions constrain the resolution (the same stack on another Python)."""
    with tempfile.TemporaryDirectory(prefix="lock-stack-") as tmp:
        _run([python, "-m", "venv", os.path.join(tmp, "venv")])
        vpy = os.path.join(tmp, "venv", "bin", "python")
        version = _run([vpy, "-c", "import platform; print(platform.python_version())"]).strip()
        report = os.path.join(tmp, "report.json")
        _run(
            [vpy, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", report, *(["-c", os.path.abspath(like)] if like else []),
             f".[{extra}]"],
            cwd=REPO,
        )  # fmt: skip
        items = json.loads(Path(report).read_text())["install"]
    pins = sorted(
        ((i["metadata"]["name"], i["metadata"]["version"]) for i in items),
        key=lambda p: p[0].lower(),
    )
    return version, [p for p in pins if p[0].lower().replace("_", "-") != PROJECT]


def lock_text(
    version: str, pins: Sequence[tuple[str, str]], command: str, extra: str = "test"
) -> str:
    major_minor = "".join(version.split(".")[:2])
    head = [
        f"# Exact versions of the {extra} extra (and train, which it includes), resolved by pip",
        f"# for Python {version} on {platform.system()} {platform.machine()}, CPU jax.",
        f"# Made by: {command}",
        "# (rerun it to refresh). Install with:",
        f'#   .venv/bin/pip install -c requirements/{extra}-py{major_minor}.txt -e ".[{extra}]"',
    ]
    return "\n".join([*head, *(f"{n}=={v}" for n, v in pins)]) + "\n"


def run(argv: Sequence[str] | None = None) -> list[str]:
    p = command_parser("python -m experiments.lock_stack", __doc__)
    p.add_argument("--python", type=existing_file, nargs="+", default=[sys.executable],
                   help="interpreters to lock for, one file each")  # fmt: skip
    p.add_argument("--like", type=existing_file, default=None,
                   help="a lock whose exact versions the new ones must equal (e.g. the "
                   "3.11 lock, for the same stack on 3.12)")  # fmt: skip
    args = p.parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    written = []
    for python in args.python:
        version, pins = resolve(python, like=args.like)
        name = f"test-py{''.join(version.split('.')[:2])}.txt"
        like = f" --like {os.path.relpath(args.like, REPO)}" if args.like else ""
        command = f"python -m experiments.lock_stack --python {python}{like}"
        (OUT_DIR / name).write_text(lock_text(version, pins, command))
        written.append(name)
        print(f"Python {version}: {len(pins)} packages -> requirements/{name}", flush=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
