"""What every command's ``main`` shares: one-line errors, list flags, one exit-status rule.

Every command in ``experiments/`` has ``main(argv=None) -> int`` and behaves the same way:
bad input is one line on stderr starting with ``error:`` and exit status 2, raised before any
long work starts; a run that fails on the way is one line and status 1; success is 0.
:func:`run_main` applies that rule to a command's body.

>>> int_list("32,256")
[32, 256]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from contrastive.settings import ConfigError, OneLineParser

__all__ = [
    "ConfigError",
    "OneLineParser",
    "command_parser",
    "int_list",
    "name_list",
    "nonnegative_int",
    "positive_int",
    "positive_float",
    "path",
    "directory",
    "output_dir",
    "existing_file",
    "run_main",
    "shared_module",
]


def command_parser(prog: str, doc: str | None) -> OneLineParser:
    """A command's parser: one-line errors, defaults in ``--help``, the doc's first paragraph."""
    return OneLineParser(
        prog=prog,
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def int_list(text: str) -> list[int]:
    """``"32,256"`` -> ``[32, 256]`` (argparse ``type``)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of integers"
        raise argparse.ArgumentTypeError(msg) from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def name_list(text: str) -> list[str]:
    """``"infonce,sigmoid"`` -> ``["infonce", "sigmoid"]`` (argparse ``type``)."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one name")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (argparse ``type``): seeds, counts where 0 means "none"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def path(text: str) -> str:
    """A file-system path with ``~`` expanded (argparse ``type``): bash leaves ``--flag=~/x``."""
    return os.path.expanduser(text)


def _nearest_existing(p: str) -> str:
    """``p`` itself if it exists, else its nearest existing ancestor (``.`` at worst)."""
    p = os.path.abspath(p)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    return p


def directory(text: str) -> str:
    """A directory that is there or can be made (argparse ``type``), ``~`` expanded: not a
    file, and not below one. Checked without creating anything."""
    p = path(text)
    if not p:
        raise argparse.ArgumentTypeError("give a directory")
    if os.path.exists(p) and not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{p} is a file; pass a directory")
    ancestor = _nearest_existing(p)
    if not os.path.isdir(ancestor):
        raise argparse.ArgumentTypeError(f"{p} is below the file {ancestor}: pass a directory")
    return p


def output_dir(text: str) -> str:
    """A directory to write into (argparse ``type``, for ``--out``): :func:`directory`, and
    its nearest existing part writable by this process. Nothing is created here: a command
    creates its run directory only once every other flag has been checked."""
    p = directory(text)
    ancestor = _nearest_existing(p)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{p} cannot be written here ({ancestor} is read-only)")
    return p


def existing_file(text: str) -> str:
    """A regular file to read (argparse ``type``), ``~`` expanded."""
    p = path(text)
    if not os.path.isfile(p):
        why = "is a directory" if os.path.isdir(p) else "does not exist"
        raise argparse.ArgumentTypeError(f"{p} {why}: pass a file")
    return p


def run_main(body: Callable[[], Any]) -> int:
    """Run a command's body under the one exit-status rule: a :class:`ConfigError` or
    ``ValueError`` raised by it is printed as one ``error:`` line (status 2); an ``int`` it
    returns is the status; anything else (its results) means success (0)."""
    try:
        status = body()
    except (ConfigError, ValueError) as e:
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def shared_module(name: str, argv: Sequence[str] | None = None) -> int:
    """What a shared module does when run as a command: say so, in one line, and exit 2.

    ``name`` is the module's ``__name__``; run with ``python -m`` that is ``"__main__"``, and
    the module's own name is read from its spec."""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = getattr(spec, "name", None) or name
    print(
        f"error: {name} is a shared module of experiments/, not a command; run one of the "
        "commands listed in README.md (python -m experiments.NAME --help)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
