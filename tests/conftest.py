"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision; and a check
that no test leaves files outside its own temporary directory.

XLA reads XLA_FLAGS once, when jax initialises its backends, so this must run before any
test module imports jax.

The leftover check (issue 21). Before collection this file points ``TMPDIR`` (and Python's
``tempfile``) at a fresh folder of this session's own, and snapshots the repository tree
and the home directory. When the session ends, after every fixture's teardown, anything
still in that folder, and any path new in the repository or the home directory, fails
the run with one line naming it (and, for the temporary folder, the test after which it
first appeared). Then the session's folder is removed. A private ``TMPDIR`` makes the
check exact: files that other processes on the machine put in the system temp dir at
the same time are not blamed on the tests, and a test's leftover cannot hide among them.
pytest's own ``tmp_path`` folders stay where they always are (``PYTEST_DEBUG_TEMPROOT``).

Under pytest-xdist (``-n 2``) every worker is a session of its own: its private temp folder
(made inside the controller's, whose ``TMPDIR`` it inherits), its own compilation cache, and
its own temp-folder check, whose findings it hands to the controller
(``workeroutput["leftovers"]``). The repository and the home directory are checked by the
controller alone, before the first worker starts and after the last one ends, so that one
worker's test never blames another's.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# --- the leftover check, part 1: before any test module is imported ------------------------

REPO = Path(__file__).resolve().parents[1]
# Caches that tools keep in the tree by design (all git-ignored); never a test's output.
REPO_CACHES = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}
HOME = Path.home()
TFDS_HOME = HOME / "tensorflow_datasets"  # where TFDS writes when no data dir is given

SYSTEM_TEMP = tempfile.gettempdir()
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", SYSTEM_TEMP)  # tmp_path stays in the system one
SESSION_TEMP = tempfile.mkdtemp(prefix="pytest-session-tmp-")
os.environ["TMPDIR"] = SESSION_TEMP  # subprocesses, TFDS, orbax, grain
tempfile.tempdir = SESSION_TEMP  # this process (tempfile caches the folder)

# One persistent compilation cache for the session (removed with its temp folder): the many
# runs of the same small training programs, in this process and in the training commands
# that tests start as subprocesses (they inherit the variables), compile each program once.
# A cached executable is the one a fresh compilation would build (the key covers the HLO,
# the compile options, the XLA flags and the jax version), so no result changes.
# A cache set by an enclosing session (the xdist controller, or the suite running the
# leftover check's probe) is replaced by this session's own: jax writes cache files without
# a lock, so two sessions writing at once could hand each other a torn entry. A cache the user
# set is kept.
COMPILATION_CACHE = os.path.join(SESSION_TEMP, "jax-compilation-cache")
_OURS = "CONTRASTIVE_TESTS_COMPILATION_CACHE"  # marks a cache dir that a session set
if os.environ.get("JAX_COMPILATION_CACHE_DIR", os.environ.get(_OURS)) == os.environ.get(_OURS):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_OURS] = COMPILATION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def _tree(root: Path, *, skip: set[str] = frozenset(), depth: int = 64) -> set[str]:
    """Every path under ``root`` (relative, ``/``-separated; folders end in ``/``), not
    descending into folders named in ``skip`` or ending in ``.egg-info``."""
    found: set[str] = set()

    def walk(folder: Path, prefix: str, left: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # removed meanwhile, or not readable
            return
        for e in entries:
            if e.name in skip or e.name.endswith(".egg-info"):
                continue
            is_dir = e.is_dir(follow_symlinks=False)
            found.add(prefix + e.name + ("/" if is_dir else ""))
            if is_dir and left > 1:
                walk(Path(e.path), prefix + e.name + "/", left - 1)

    walk(root, "", depth)
    return found


def _outermost(paths: set[str]) -> list[str]:
    """The new paths, without those inside a folder that is itself new."""
    return sorted(p for p in paths if not any(p != q and p.startswith(q) for q in paths))


def _home_snapshot() -> set[str]:
    top = {name + "/" if (HOME / name).is_dir() else name for name in _listdir(HOME)}
    return top | {"tensorflow_datasets/" + p for p in _tree(TFDS_HOME, depth=3)}


def _listdir(folder: str | Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


REPO_BEFORE = _tree(REPO, skip=REPO_CACHES)
HOME_BEFORE = _home_snapshot()
FIRST_SEEN: dict[str, str] = {}  # temp entry -> the test after which it first appeared

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import Phase, settings  # noqa: E402

# CI runs the same examples every time (a failure reproduces); locally, new ones each run.
# CI does not shrink a failure (minutes on 2 cores): the example it prints is the report.
# Nor does it replay a local example database: `CI=1` here draws exactly what CI draws.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate],
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


# --- the leftover check, part 2: who left what, and the verdict ------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Note the test after which each entry of the session's temp folder first appeared
    (a listing per test: microseconds). A module fixture's folder, removed at its
    teardown, is noted too but is gone by the end, so it is never reported."""
    result = yield
    for name in _listdir(SESSION_TEMP):
        FIRST_SEEN.setdefault(name, item.nodeid)
    return result


WORKER_LEFTOVERS: list[str] = []  # what xdist workers found in their own temp folders


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(xdist controller) Collect what a finished worker found in its temp folder."""
    WORKER_LEFTOVERS.extend(getattr(node, "workeroutput", {}).get("leftovers", []))


def leftovers(*, repository_and_home: bool = True) -> list[str]:
    """What the session left outside pytest's temporary folders, as ``place: path`` items;
    the repository and the home directory only if ``repository_and_home``."""
    found = []
    if os.environ.get("TMPDIR") != SESSION_TEMP:  # later temp files went elsewhere
        found.append(f"TMPDIR changed to {os.environ.get('TMPDIR')!r} and never restored")
    if tempfile.tempdir != SESSION_TEMP:
        found.append(f"tempfile.tempdir changed to {tempfile.tempdir!r} and never restored")
    for name in sorted(set(_listdir(SESSION_TEMP)) - {os.path.basename(COMPILATION_CACHE)}):
        slash = "/" if os.path.isdir(os.path.join(SESSION_TEMP, name)) else ""
        after = f" (after {FIRST_SEEN[name]})" if name in FIRST_SEEN else ""
        found.append(f"temp dir: {name}{slash}{after}")
    if repository_and_home:
        new = _tree(REPO, skip=REPO_CACHES) - REPO_BEFORE
        found += [f"repository: {p}" for p in _outermost(new)]
        found += [f"home: ~/{p}" for p in _outermost(_home_snapshot() - HOME_BEFORE)]
    return found


@pytest.hookimpl(trylast=True)  # after the runner's hook, which tears down session fixtures
def pytest_sessionfinish(session, exitstatus):
    """Fail the run, in one line, if anything was left behind; then remove the session's
    temp folder (the line has named what was in it)."""
    worker = getattr(session.config, "workerinput", None) is not None
    try:
        found = leftovers(repository_and_home=not worker)
        if worker:  # the controller reports it, with the repository and home check
            session.config.workeroutput["leftovers"] = found
            return
        found += WORKER_LEFTOVERS
        if found:
            more = f"; and {len(found) - 8} more" if len(found) > 8 else ""
            shown = "; ".join(found[:8]) + more
            line = (
                f"error: tests left files outside their tmp_path: {shown} "
                "(write into tmp_path, or remove what the test created)"
            )
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write("\n")  # after the progress dots
                reporter.write_line(line, red=True, bold=True)
            else:
                print(line, file=sys.stderr)
            if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
    finally:
        shutil.rmtree(SESSION_TEMP, ignore_errors=True)
