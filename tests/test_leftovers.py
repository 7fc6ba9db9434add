"""The suite's leftover check (tests/conftest.py) fails a run that leaves files behind.

Each case runs pytest in a subprocess on a copy of the conftest inside a throwaway
"repository" under tmp_path, with its own system temp dir and home directory, so that
the probe tests can litter all three without touching this machine's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

LEAKY = """
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_leaves_a_temp_file():
    fd, _ = tempfile.mkstemp(prefix="probe-temp-")
    os.close(fd)


def test_leaves_a_file_in_the_repository():
    (REPO / "runs" / "probe-run").mkdir(parents=True)  # a git-ignored folder counts too
    (REPO / "runs" / "probe-run" / "metrics.jsonl").write_text("{}")


def test_leaves_tfds_data_in_home():
    (Path.home() / "tensorflow_datasets" / "probe_ds").mkdir(parents=True)


def test_clean(tmp_path):
    (tmp_path / "fine.txt").write_text("inside tmp_path")


def test_points_tempfile_elsewhere(tmp_path):
    tempfile.tempdir = str(tmp_path)  # never restored
"""

CLEAN = """
import subprocess
import sys
import tempfile


def test_tmp_path_and_removed_temp_files(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    with tempfile.TemporaryDirectory() as d, open(f"{d}/b.txt", "w") as f:
        f.write("removed on exit")


def test_subprocess_temp_file_removed():
    code = "import os, tempfile; fd, p = tempfile.mkstemp(); os.close(fd); os.remove(p)"
    subprocess.run([sys.executable, "-c", code], check=True)
"""


def _run_probe(
    tmp_path: Path, body: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, Path]:
    """pytest on ``body`` (with the options ``extra``) in a throwaway repository; returns the
    run and its system temp."""
    repo, home, system_temp = tmp_path / "repo", tmp_path / "home", tmp_path / "systemtmp"
    (repo / "tests").mkdir(parents=True)
    (repo / "runs").mkdir()  # a git-ignored output folder that already exists
    home.mkdir()
    system_temp.mkdir()
    shutil.copy(TESTS / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_probe.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(system_temp)}
    env.pop("PYTEST_DEBUG_TEMPROOT", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(repo),
         "--basetemp", str(tmp_path / "basetemp"), *extra, "tests/test_probe.py"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, system_temp


# Also under pytest-xdist: each worker checks its own temp folder and hands its findings to
# the controller, which checks the repository and the home directory and reports in one line.
@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["one process", "xdist -n 2"])
@pytest.mark.parametrize("probe", ["leaky", "clean"])
def test_leftovers_fail_the_run_naming_each(tmp_path, probe, workers):
    done, system_temp = _run_probe(tmp_path, LEAKY if probe == "leaky" else CLEAN, workers)
    out = done.stdout + done.stderr
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    if probe == "clean":
        assert done.returncode == 0 and errors == [], out[-3000:]
    else:
        # Every test passed; the leftovers alone fail the run, in one line naming each.
        assert done.returncode == 1 and "5 passed" in out, out[-3000:]
        (line,) = errors
        assert line.startswith("error: tests left files outside their tmp_path: "), line
        assert "(after tests/test_probe.py::test_leaves_a_temp_file)" in line, line
        assert "temp dir: probe-temp-" in line, line
        assert "repository: runs/probe-run/;" in line, line  # the new folder, not each file
        assert "home: ~/tensorflow_datasets/" in line, line
        assert "tempfile.tempdir changed to " in line and "TMPDIR changed" not in line, line
        assert "test_clean" not in line, line
    # The run's private temp dir is removed at the end, whatever it held.
    assert os.listdir(system_temp) == [], os.listdir(system_temp)
