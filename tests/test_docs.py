"""Every runnable example in a docstring runs and prints what it says.

One test per module of ``losses``, ``contrastive`` and ``experiments`` whose source holds an
example that doctest does not skip, found by parsing the source text (no import at
collection), so that a new or moved module is checked without being listed here.
"""

from __future__ import annotations

import doctest
import importlib
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("losses", "contrastive", "experiments")


def _has_examples(source: str) -> bool:
    try:
        examples = doctest.DocTestParser().get_examples(source)
    except ValueError:  # malformed: let doctest itself say what is wrong
        return True
    return any(not example.options.get(doctest.SKIP) for example in examples)


def modules_with_examples() -> list[str]:
    """Dotted names of the modules whose docstrings hold an example that runs."""
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if _has_examples(path.read_text()):
                parts = path.relative_to(REPO).with_suffix("").parts
                names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_the_examples_are_found():
    # The finder itself: modules known to hold examples, and one whose only one is skipped.
    for name in (
        "losses",
        "losses.infonce",
        "contrastive.run.checkpoint_disk",
        "experiments.common.cli",
    ):
        assert name in MODULES, name
    assert "contrastive.data.pipeline" not in MODULES  # its one example is `+SKIP`


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    # Examples that make a folder with tempfile.mkdtemp() make it inside tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example that runs"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
