"""Every command answers bad input in one line: ``error: ...`` on stderr, exit status 2,
before any work, and nothing left on disk.

The test walks every command module of ``experiments/`` (each ``experiments/*.py`` with a
``main(argv) -> int``), reads the flags its parser defines (the parser is caught as it
parses ``--help``), and gives each flag that takes a value one invalid value: ``-5`` for a
number, ``zzz`` for a choice, a list or a name, a path below a regular file for a path.
Each call runs with the current directory and ``$HOME`` inside ``tmp_path`` (a default
``runs/`` or ``~/...`` would land there), and with the first step of real work of every
command (creating its run directory, setting up a training run) replaced by a trap, so that
a bad value that slips through fails the test at once instead of starting the work.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.common import cli, run_dir

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(
    p.stem for p in (REPO / "experiments").glob("*.py") if p.stem != "__init__"
)  # fmt: skip
SHARED = sorted(p.stem for p in (REPO / "experiments" / "common").glob("*.py")
                if p.stem != "__init__")  # fmt: skip

# Flags that name a file or directory: the invalid value is a path below a regular file.
PATH_FLAGS = {"--out", "--data-dir", "--workdir", "--feature-cache", "--from-records", "--rates"}
PATH_TYPES = (cli.path, cli.directory, cli.output_dir, cli.existing_file)
NUMBER_TYPES = {"int", "float", "positive_int", "positive_float", "nonnegative_int"}

# Flags that legitimately take any value of their type: no invalid value to give.
ANY_VALUE = {
    # SigLIP's logit bias is any finite real; its default is -10.
    ("train", "--bias"),
}

# Arguments a command needs before it looks at anything else (the flag under test comes
# after them): ``{tmp}`` is replaced with the test's tmp_path.
REQUIRED = {
    "train": ["--workdir", "{tmp}/work"],
    "prepare_pairs": ["--captions", "{tmp}/a-file", "--images", "{tmp}", "--out", "{tmp}/pairs"],
}


class StartedWork(BaseException):
    """Raised by the trap: a command got past its checks (not an Exception, so that no
    command's own ``except`` turns it into an error line)."""


def _trap(*args, **kwargs):
    raise StartedWork("the command started work (a run directory, a training run)")


def _traps(module, monkeypatch) -> None:
    """Replace the first step of real work, wherever a command reaches it."""
    import contrastive.run.loop as loop

    real = {run_dir.create, loop.setup, loop._train_on_hosts}
    monkeypatch.setattr(run_dir, "create", _trap)
    for name in ("setup", "_train_on_hosts"):
        monkeypatch.setattr(loop, name, _trap)
    for name, obj in list(vars(module).items()):  # names imported into the command itself
        if any(obj is r for r in real):
            monkeypatch.setattr(module, name, _trap)


def _parser_of(module, capsys) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught as it parses ``--help``."""
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return real(self, args, namespace)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_known_args", spy)
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
    assert e.value.code in (0, None), f"{module.__name__} --help exited {e.value.code}"
    out = capsys.readouterr()
    assert "usage:" in out.out and "--help" in out.out, module.__name__
    assert seen, f"{module.__name__}: no argparse parser parsed --help"
    return seen[0]


def _value_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs != 0]


def _invalid(action: argparse.Action, tmp: Path) -> str:
    flag = action.option_strings[-1]
    if action.choices:
        return "zzz"
    if action.type in PATH_TYPES or flag in PATH_FLAGS:
        return str(tmp / "a-file" / "below")
    if getattr(action.type, "__name__", "str") in NUMBER_TYPES:
        return "-5"
    return "zzz"  # lists, names, sizes, free-form settings


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cases():
    """(command, flag) for every flag that takes a value; collected at import (cheap: the
    parsers are built, nothing runs)."""
    cases = []
    for name in COMMANDS:
        module = importlib.import_module(f"experiments.{name}")
        parser = _collect_parser(module)
        for action in _value_flags(parser):
            flag = action.option_strings[-1]
            if (name, flag) not in ANY_VALUE:
                cases.append(pytest.param(name, flag, id=f"{name} {flag}"))
    return cases


def _collect_parser(module) -> argparse.ArgumentParser:
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        raise StartedWork  # stop at the parse: nothing printed, nothing run

    argparse.ArgumentParser.parse_known_args = spy
    try:
        with contextlib.suppress(StartedWork):
            module.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_known_args = real
    assert seen, f"{module.__name__}: main() parsed no flags"
    return seen[0]


CASES = _cases()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd and $HOME inside tmp_path, one regular file to put paths below; yields the files
    there before the call."""
    (tmp_path / "a-file").write_text("not a directory\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _call(module, argv, capsys) -> tuple[int, str, str]:
    try:
        code = module.main(argv)
    except SystemExit as e:  # argparse's own errors (one line: OneLineParser)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", COMMANDS)
def test_help_describes_every_flag(name, sandbox, capsys):
    """``--help`` exits 0 with the usage; every flag has a help text; every path flag
    expands ``~`` (a ``cli`` path type; the training command's settings expand it when the
    config is built)."""
    module = importlib.import_module(f"experiments.{name}")
    before = _snapshot(sandbox)
    parser = _parser_of(module, capsys)
    assert _snapshot(sandbox) == before
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{name} {flag} has no help text"
        if flag in PATH_FLAGS and name != "train":
            assert action.type in PATH_TYPES, f"{name} {flag} does not expand ~ (cli.path)"


@pytest.mark.parametrize("name, flag", CASES)
def test_an_invalid_value_is_one_line_and_exit_2(name, flag, sandbox, monkeypatch, capsys):
    module = importlib.import_module(f"experiments.{name}")
    parser = _collect_parser(module)
    (action,) = [a for a in _value_flags(parser) if a.option_strings[-1] == flag]
    value = _invalid(action, sandbox)
    required = [a.replace("{tmp}", str(sandbox)) for a in REQUIRED.get(name, [])]
    _traps(module, monkeypatch)
    before = _snapshot(sandbox)
    try:
        code, out, err = _call(module, [*required, f"{flag}={value}"], capsys)
    except StartedWork:
        pytest.fail(f"{name} {flag}={value}: accepted, and the command started work")
    lines = err.strip().splitlines()
    assert code == 2, f"{name} {flag}={value}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name} {flag}={value}: {err!r}"
    assert "Traceback" not in err
    # The error is about this flag (not, say, a missing required one).
    assert flag in lines[0], f"{name} {flag}: {lines[0]}"
    assert out == "", f"{name} {flag}={value} printed {out!r}"
    created = _snapshot(sandbox) - before
    assert not created, f"{name} {flag}={value} created {sorted(created)}"
    assert not (sandbox / "runs").exists()


def test_the_walk_covers_every_command():
    """Every command is walked and has flags with values (the walk is not vacuous)."""
    assert {"train", "plan", "bench_losses", "sweep_memory", "soak"} <= set(COMMANDS)
    walked = {c.values[0] for c in CASES}
    assert walked == set(COMMANDS)


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_module_run_as_a_command_says_so(name, capsys):
    """``python -m experiments.common.<name>``: one line, exit 2 (run here as ``__main__``
    through runpy, as ``-m`` does)."""
    import runpy
    import sys
    import warnings

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(sys, "argv", [f"experiments.common.{name}"])
        # runpy warns that the module is imported already: this runs a fresh copy of it.
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as e:
            # alter_sys: the copy is sys.modules["__main__"] with its spec, as under -m.
            runpy.run_module(f"experiments.common.{name}", run_name="__main__", alter_sys=True)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: experiments.common.{name} is a shared")


def test_cases_and_batches_are_checked_before_anything(sandbox, capsys):
    """The issue's examples: each one line, exit 2, no run directory."""
    from experiments import bench_losses, bench_ring, plan

    for module, argv, start in [
        (bench_losses, ["--cases", "foo"], "error: --cases 'foo': unknown case(s) foo; choose from "
         "infonce, sigmoid, decoupled"),
        (bench_losses, ["--batch", "-5"], "error: argument --batch: must be at least 1"),
        (plan, ["--model", "vit-zzz"], "error: --model 'vit-zzz': choose one of"),
        (bench_ring, ["--devices", "0"], "error: argument --devices: must be at least 1"),
        (bench_ring, ["--memory-batch", "12", "--time-batch", "--devices", "8"],
         "error: no batch size of --time-batch [] and --memory-batch [12] is a multiple"),
    ]:  # fmt: skip
        code, out, err = _call(module, argv, capsys)
        assert code == 2 and err.startswith(start) and len(err.strip().splitlines()) == 1, err
    assert _snapshot(sandbox) == {"a-file", "home"}


def test_tilde_expands_in_every_path_type(sandbox):
    home = Path(os.environ["HOME"])
    (home / "records.json").write_text("{}")
    assert cli.path("~/x") == str(home / "x")
    assert cli.directory("~/new/dir") == str(home / "new" / "dir")
    assert cli.output_dir("~") == str(home)
    assert cli.existing_file("~/records.json") == str(home / "records.json")
    for check in (cli.directory, cli.output_dir):
        with pytest.raises(argparse.ArgumentTypeError, match="below the file"):
            check(str(sandbox / "a-file" / "x"))
        with pytest.raises(argparse.ArgumentTypeError, match="is a file; pass a directory"):
            check(str(sandbox / "a-file"))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        cli.existing_file("~/missing.json")
    assert not (sandbox / "new").exists() and not (home / "new").exists()  # nothing created


def test_plan_rejects_records_that_are_not_a_plan(sandbox, capsys):
    from experiments import plan

    (sandbox / "other.json").write_text('{"rows": []}')
    code, out, err = _call(plan, ["--from-records", str(sandbox / "other.json")], capsys)
    assert code == 2 and err.startswith("error: --from-records ") and "not the plan.json" in err
    assert not (sandbox / "runs").exists()


# --- the library's front doors: the losses on Python lists, a data set not prepared ---------


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
@given(batch=st.integers(2, 9), dim=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_a_loss_takes_nested_lists_as_the_arrays_they_spell(name, batch, dim, seed):
    """``losses.<name>(list, list)`` is the loss of ``jnp.asarray`` of the lists (float32),
    and equals the dense reference on the same lists."""
    import jax.numpy as jnp
    import numpy as np

    import losses

    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(2))
    xl, yl = x.tolist(), y.tolist()
    got = getattr(losses, name)(xl, yl)
    assert got.dtype == jnp.float32
    # The same float32 numbers as arrays: the same computation, bit for bit.
    assert float(got) == float(getattr(losses, name)(jnp.asarray(x), jnp.asarray(y)))
    want = getattr(losses.reference, name)(xl, yl)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
@pytest.mark.parametrize(
    "x, error, message",
    [
        ([[1.0, 0.0], [0.0]], TypeError, "x must be an array of shape \\(batch, dim\\)"),
        ("embeddings", TypeError, "x must be an array of shape \\(batch, dim\\)"),
        ([[1, 0], [0, 1]], TypeError, "x must be a floating-point array"),
        ([1.0, 0.0], ValueError, "x must have shape \\(batch, dim\\)"),
    ],
)  # fmt: skip
def test_a_loss_names_itself_for_what_is_no_array(name, x, error, message):
    import losses

    for f in (getattr(losses, name), getattr(losses.reference, name)):
        with pytest.raises(error, match=message) as info:
            f(x, [[1.0, 0.0], [0.0, 1.0]])
        assert str(info.value).startswith(f"{name}: ") and "\n" not in str(info.value)


def test_a_data_set_not_prepared_is_one_line_without_warnings(tmp_path, capsys, caplog):
    """``--dataset cifar10`` with an empty ``--data-dir``: the fix in one line, no TFDS
    (absl) warning, no exception-type suffix."""
    import logging

    from contrastive.data.pipeline import load_source

    empty = tmp_path / "empty"
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError) as info:
        load_source("cifar10", "train", empty)
    message = str(info.value)
    assert message.startswith("dataset 'cifar10' (cifar10, split 'train') is not prepared in ")
    assert "tfds build cifar10" in message and message.endswith("use --dataset digits (offline)")
    assert "\n" not in message
    assert not [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
    assert logging.getLogger("absl").level == logging.NOTSET  # left as it was
    assert capsys.readouterr().err == ""
    assert not empty.exists()


def test_a_result_without_its_stack_is_not_published(tmp_path):
    """``--update-results`` copies nothing when a JSON result does not record the versions
    and machine that made it; one that does is copied, stack and all."""
    import json

    from experiments.common.reports import stack_record

    out, results = tmp_path / "run", tmp_path / "results"
    out.mkdir()
    (out / "bare.json").write_text(json.dumps({"rows": [1]}))
    (out / "bare.md").write_text("| a |")
    with pytest.raises(ValueError, match="bare.json records no 'stack'") as info:
        run_dir.publish(out, ["bare.md", "bare.json"], results_dir=results)
    assert "\n" not in str(info.value) and not results.exists()  # checked before any copy

    stack = stack_record(devices=False)
    assert {"python", "packages", "cpu", "os"} <= set(stack) and stack["packages"]["jax"]
    (out / "made.json").write_text(json.dumps({"rows": [1], "stack": stack}))
    run_dir.publish(out, ["made.json"], results_dir=results)
    assert json.loads((results / "made.json").read_text())["stack"] == stack
