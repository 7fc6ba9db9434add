"""The runnable examples in the loss docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["losses", "losses.infonce", "losses.decoupled", "losses.sigmoid", "losses._sharded"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
