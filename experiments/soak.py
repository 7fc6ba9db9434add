"""Kill-and-resume soak: interrupt a training run many times, check it loses nothing.

``python -m experiments.soak`` trains a small MLP on the offline digits through the training
command (``python -m experiments.train --workdir W ...``, one checkpoint per step) and
interrupts it again and again from a seeded schedule: SIGKILL, SIGTERM (a preemption: the run
saves and exits) and a double SIGINT (Ctrl-C twice: the second one lands while the stop's
checkpoint is being written), at random moments: during start-up, between steps, and right
inside a checkpoint write (when orbax's temporary folder appears). After each interruption
it starts the same command again. At the end it compares the run with an uninterrupted one:

- the final checkpoint's parameters, optimiser state, PRNG key and data position restore
  (with orbax) bit-identical;
- ``metrics.jsonl`` logs every step once, in order, none missing, with bit-identical values
  (the wall-clock ``elapsed_s`` aside);
- TensorBoard event files, when the training loop writes them: every scalar of every step
  once, bit-identical.

Prints a line per interruption and a summary (interruptions survived, steps redone after
kills, steps lost or logged twice), writes ``soak.json`` and the runs' logs into the run
directory (``--out``), and exits 1 if any check fails.

    python -m experiments.soak                          # 20 interruptions, ~10 CPU-minutes
    python -m experiments.soak --steps 16 --interruptions 4 --seed 1
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.common.cli import (
    command_parser,
    nonnegative_int,
    output_dir,
    positive_int,
    run_main,
)
from experiments.common.run_dir import create

REPO = Path(__file__).resolve().parents[1]
KINDS = ("SIGKILL", "SIGTERM", "SIGINT+SIGINT")
MOMENTS = ("checkpoint", "step", "startup")
ORBAX_TMP = ".orbax-checkpoint-tmp"
METRICS = "metrics.jsonl"
WALL_CLOCK = {"elapsed_s"}  # metrics that measure time, not the computation
WAIT_EXIT_S = 120.0  # a run that outlives its SIGTERM / second SIGINT this long hangs


@dataclasses.dataclass(frozen=True)
class Interruption:
    """One scheduled interruption: which signal(s), and when.

    ``moment``: ``"checkpoint"`` = as soon as a new orbax temporary folder appears (a
    checkpoint write is under way); ``"step"`` = ``ahead`` steps after the last logged one,
    then ``fraction`` of a step later; ``"startup"`` = ``fraction`` of the start-up time
    after launch (imports, compilation, restore).
    """

    kind: str
    moment: str
    ahead: int
    fraction: float


def schedule(n: int, seed: int) -> list[Interruption]:
    """``n`` interruptions from ``seed``: every kind equally often (in a shuffled order), a
    checkpoint-write moment for about half of them, start-up for about one in seven."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    moments = rng.choices(MOMENTS, weights=(0.5, 0.35, 0.15), k=n)
    if n >= 2 and "checkpoint" not in moments:
        moments[rng.randrange(n)] = "checkpoint"
    return [
        Interruption(kind, moment, rng.randrange(0, 3), round(rng.random(), 3))
        for kind, moment in zip(kinds, moments, strict=True)
    ]


# --- the run on disk -------------------------------------------------------------------


def logged_records(workdir: Path) -> list[tuple[int, str]]:
    """``(step, line)`` of the whole records in ``metrics.jsonl``, in file order."""
    path = workdir / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    return out


def logged_steps(workdir: Path) -> list[int]:
    """The steps of the whole records in ``metrics.jsonl``, in file order."""
    return [step for step, _ in logged_records(workdir)]


def checkpoint_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def _tmp_dirs(workdir: Path) -> set[tuple[str, int]]:
    """orbax's temporary checkpoint folders as ``(name, inode)``: a folder left by an earlier
    kill and one created anew under the same name differ by inode."""
    d = workdir / "checkpoints"
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return set()
    out = set()
    for e in entries:
        if ORBAX_TMP in e.name:
            try:
                out.add((e.name, e.inode()))
            except OSError:
                continue
    return out


# --- one attempt -------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    """What happened to one started run."""

    interruption: Interruption | None
    resumed_from: int = 0  # the newest checkpoint when it started
    signalled_at_s: float | None = None  # after launch
    steps_at_signal: int = 0  # steps this start had logged when the signal left
    in_checkpoint_write: bool = False  # a temporary folder existed when the signal left
    exit_code: int | None = None
    exit_after_signal_s: float | None = None  # after the last signal sent
    finished_first: bool = False  # the run ended before the interruption could land
    hung: bool = False
    last_stderr: str = ""
    logged_to: int = 0  # last whole step in metrics.jsonl when it ended
    checkpoint: int = 0  # newest checkpoint when it ended
    redone: int = 0  # steps it logged past its last checkpoint: done again by the next start


class _Run:
    def __init__(self, cmd: list[str], env: dict[str, str], workdir: Path, logs: Path):
        self.workdir = workdir
        # What earlier starts left in the log: records this start writes are new lines
        # (their elapsed_s differs), so they can be told apart from stale ones it drops.
        self.stale = {line for _, line in logged_records(workdir)}
        self.resumed_from = max(checkpoint_steps(workdir), default=0)
        self.t0 = time.perf_counter()
        self.err_path = logs.with_suffix(".err")
        self._out = open(logs.with_suffix(".out"), "w")  # noqa: SIM115 - closed in wait()
        self._err = open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err, text=True
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def new_steps(self) -> list[int]:
        """The steps this start has logged so far."""
        return [step for step, line in logged_records(self.workdir) if line not in self.stale]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have ended already
            self.proc.send_signal(sig)

    def wait_for(self, condition, timeout: float, poll: float = 0.002) -> bool:
        """Poll ``condition()`` until it holds (True) or the run ends / time runs out."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if condition():
                return True
            if not self.alive():
                return False
            time.sleep(poll)
        return False

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if not self.alive():
                self._out.close()
                self._err.close()

    def last_stderr_line(self) -> str:
        lines = [x for x in self.err_path.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""


def _interrupt(run: _Run, it: Interruption, steps: int, timing: dict[str, float]) -> Attempt:
    a = Attempt(it)
    workdir = run.workdir
    before = _tmp_dirs(workdir)
    new_tmp = lambda: bool(_tmp_dirs(workdir) - before)  # noqa: E731
    if it.moment == "startup":
        run.wait_for(lambda: False, it.fraction * timing["startup_s"], poll=0.01)
        landed = run.alive()
    elif it.moment == "step":
        # Past both the checkpoint it resumes from and any stale records of the killed run
        # (the new run drops those when it opens the log).
        done = max([*logged_steps(workdir), *checkpoint_steps(workdir), 0])
        target = min(done + 1 + it.ahead, steps - 1)
        landed = run.wait_for(
            lambda: max(logged_steps(workdir), default=0) >= target, 600.0, poll=0.01
        )
        if landed:
            time.sleep(it.fraction * timing["step_s"])
            landed = run.alive()
    else:  # checkpoint: the moment orbax's temporary folder of a new save appears
        landed = run.wait_for(new_tmp, 600.0)
    if not landed:
        a.finished_first = True
    else:
        a.signalled_at_s = round(run.elapsed(), 3)
        a.steps_at_signal = len(run.new_steps())
        a.in_checkpoint_write = new_tmp()
        if it.kind == "SIGKILL":
            run.send(signal.SIGKILL)
        elif it.kind == "SIGTERM":
            run.send(signal.SIGTERM)
        else:
            run.send(signal.SIGINT)
            # The second Ctrl-C: while the stop's checkpoint is written, if it gets there.
            before = _tmp_dirs(workdir)
            run.wait_for(new_tmp, 30.0)
            a.in_checkpoint_write = a.in_checkpoint_write or new_tmp()
            run.send(signal.SIGINT)
    t_sig = time.perf_counter()
    code = run.wait(WAIT_EXIT_S if not a.finished_first else 600.0)
    if code is None:
        a.hung = True
        run.send(signal.SIGKILL)
        code = run.wait(60.0)
    a.exit_code = code
    a.exit_after_signal_s = round(time.perf_counter() - t_sig, 3)
    return a


def _finish(a: Attempt, run: _Run) -> Attempt:
    a.last_stderr = run.last_stderr_line()
    a.resumed_from = run.resumed_from
    a.logged_to = max(logged_steps(run.workdir), default=0)
    a.checkpoint = max(checkpoint_steps(run.workdir), default=0)
    a.redone = sum(step > a.checkpoint for step in run.new_steps())
    return a


def _describe(i: int, n: int, a: Attempt) -> str:
    it = a.interruption
    assert it is not None
    where = {
        "checkpoint": "as a checkpoint write began",
        "step": "mid-run",
        "startup": "soon after launch",
    }[it.moment]
    if a.finished_first:
        return f"interruption {i}/{n}: {it.kind} {where}: the run finished first"
    inside = ", a checkpoint write under way" if a.in_checkpoint_write else ""
    return (
        f"interruption {i}/{n}: {it.kind} {where} ({a.steps_at_signal} step(s) after "
        f"checkpoint {a.resumed_from}{inside}) at {a.signalled_at_s:.1f} s -> exit "
        f"{a.exit_code} after {a.exit_after_signal_s:.2f} s{' (HUNG)' if a.hung else ''}; "
        f"logged to step {a.logged_to}, checkpoint {a.checkpoint}, {a.redone} step(s) to redo"
    )


# --- comparing with the uninterrupted run ------------------------------------------------


def _records(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / METRICS
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def compare_metrics(ref: Path, soak: Path, steps: int) -> list[str]:
    """Problems with the soak's ``metrics.jsonl`` against the reference's (empty: none)."""
    problems = []
    a, b = _records(ref), _records(soak)
    sa, sb = [r["step"] for r in a], [r["step"] for r in b]
    if sa != list(range(1, steps + 1)):
        problems.append(f"the uninterrupted run logged steps {sa[:5]}... not 1..{steps}")
    twice = sorted({s for s in sb if sb.count(s) > 1})
    missing = sorted(set(sa) - set(sb))
    if twice:
        problems.append(f"steps logged twice: {twice}")
    if missing:
        problems.append(f"steps missing from the log: {missing}")
    if sb != sorted(sb):
        problems.append("steps logged out of order")
    ref_by_step = {r["step"]: r for r in a}
    for r in b:
        want = ref_by_step.get(r["step"])
        if want is None:
            continue
        for k in sorted((set(want) | set(r)) - WALL_CLOCK):
            if repr(want.get(k)) != repr(r.get(k)):
                problems.append(
                    f"step {r['step']}: {k} = {r.get(k)!r}, uninterrupted {want.get(k)!r}"
                )
                break
    return problems


def _restore(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({leaf path: numpy array}, meta)`` of one checkpoint, read with orbax as host arrays
    (any device count)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Metadata file does not exist" for the item folder
    try:
        with ocp.PyTreeCheckpointer() as c:
            md = c.metadata(checkpoint / "state")
            tree = getattr(md, "item_metadata", md)
            tree = getattr(tree, "tree", tree)
            args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = c.restore(checkpoint / "state", restore_args=args)
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
            meta = c.restore(checkpoint / "meta")
    finally:
        absl.setLevel(level)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


def compare_checkpoints(ref: Path, soak: Path, steps: int) -> tuple[list[str], int]:
    """Problems with the soak's final checkpoint against the reference's, and the number of
    arrays compared."""
    a_dir, b_dir = ref / "checkpoints" / str(steps), soak / "checkpoints" / str(steps)
    for d in (a_dir, b_dir):
        if not d.is_dir():
            return [f"no final checkpoint {d}"], 0
    (a, meta_a), (b, meta_b) = _restore(a_dir), _restore(b_dir)
    problems = []
    if set(a) != set(b):
        problems.append(f"the checkpoints hold different leaves: {sorted(set(a) ^ set(b))[:3]}")
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            problems.append(f"final state{k} differs from the uninterrupted run's")
    if meta_a != meta_b:
        problems.append(f"final meta differs: {meta_b!r:.200} vs {meta_a!r:.200}")
    return problems, len(a)


def compare_event_files(ref: Path, soak: Path) -> tuple[list[str], int]:
    """Problems with the soak's TensorBoard scalars against the reference's, and the number
    of event-file directories compared (0: the loop writes none)."""
    dirs = sorted({p.parent for p in ref.rglob("*tfevents*") if p.is_file()})
    soak_dirs = sorted({p.parent for p in soak.rglob("*tfevents*") if p.is_file()})
    problems = []
    if len(soak_dirs) != len(dirs):
        problems.append(f"event files in {len(soak_dirs)} directories, uninterrupted {len(dirs)}")
    if not dirs:
        return problems, 0
    from contrastive.run.metric_writers import read_scalars

    for d in dirs:
        rel = d.relative_to(ref)
        want, got = read_scalars(d), read_scalars(soak / rel)
        for tag in sorted(set(want) | set(got)):
            ws, gs = want.get(tag, []), got.get(tag, [])
            steps = [s for s, _ in gs]
            twice = sorted({s for s in steps if steps.count(s) > 1})
            if twice:
                problems.append(f"{rel}/{tag}: steps written twice: {twice[:10]}")
            missing = sorted({s for s, _ in ws} - set(steps))
            if missing:
                problems.append(f"{rel}/{tag}: steps missing: {missing[:10]}")
            clock = tag.rsplit("/", 1)[-1] in WALL_CLOCK  # differs from run to run
            same = [(s, repr(v)) for s, v in gs] == [(s, repr(v)) for s, v in ws]
            if not (twice or missing or clock or same):
                problems.append(f"{rel}/{tag}: values differ from the uninterrupted run's")
    return problems, len(dirs)


# --- the soak ------------------------------------------------------------------------------


def train_command(workdir: Path, data_dir: Path, *, steps: int, checkpoint_every: int) -> list:
    """The training command of the soak (the same for every start, and for the reference)."""
    return [
        sys.executable, "-m", "experiments.train", "--workdir", str(workdir),
        "--data-dir", str(data_dir), "--model", "mlp", "--width", "32", "--embed-dim", "16",
        "--head-hidden", "none", "--batch-size", "32", "--steps", str(steps),
        "--checkpoint-every", str(checkpoint_every), "--keep-checkpoints", "2",
        "--log-every", "1", "--warmup-steps", "2", "--eval-examples", "128", "--no-progress",
    ]  # fmt: skip


def child_env(devices: int) -> dict[str, str]:
    """CPU with ``devices`` simulated devices (the tests' set-up), whatever this process has."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _reference(cmd: list[str], env: dict[str, str], workdir: Path, logs: Path) -> dict:
    """The uninterrupted run; also times its start-up and its steps for the schedule."""
    run = _Run(cmd, env, workdir, logs)
    run.wait_for(lambda: bool(logged_steps(workdir)), 600.0, poll=0.01)
    first = run.elapsed()
    n0 = max(logged_steps(workdir), default=0)
    code = run.wait(1800.0)
    total = run.elapsed()
    n = max(logged_steps(workdir), default=0)
    if code != 0:
        raise RuntimeError(
            f"the uninterrupted run failed (exit {code}): {run.last_stderr_line() or 'no output'}"
        )
    step_s = max(0.01, (total - first) / max(1, n - n0)) if n > n0 else 0.5
    return {"startup_s": round(first, 3), "step_s": round(step_s, 3), "total_s": round(total, 3)}


def soak(
    *,
    steps: int,
    interruptions: int,
    seed: int,
    checkpoint_every: int,
    devices: int,
    run_dir: Path,
    log=print,
) -> dict[str, Any]:
    """Run the soak in ``run_dir``; returns the report (``report["ok"]``: every check passed)."""
    data_dir, ref, work, logs = (run_dir / n for n in ("data", "reference", "soak", "logs"))
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(devices)
    kw = {"steps": steps, "checkpoint_every": checkpoint_every}
    plan = schedule(interruptions, seed)

    log(f"uninterrupted run of {steps} steps ...")
    timing = _reference(train_command(ref, data_dir, **kw), env, ref, logs / "reference")
    log(
        f"  start-up {timing['startup_s']:.1f} s, {timing['step_s']:.2f} s per step; now "
        f"{interruptions} interruptions"
    )
    attempts: list[Attempt] = []
    cmd = train_command(work, data_dir, **kw)
    for i, it in enumerate(plan, 1):
        run = _Run(cmd, env, work, logs / f"attempt{i:03d}")
        a = _finish(_interrupt(run, it, steps, timing), run)
        attempts.append(a)
        log("  " + _describe(i, len(plan), a))
        if a.finished_first:
            break
    run = _Run(cmd, env, work, logs / "final")
    final_code = run.wait(1800.0)
    if final_code is None:
        run.send(signal.SIGKILL)
        run.wait(60.0)
    final = _finish(Attempt(None, exit_code=final_code), run)
    attempts.append(final)

    problems: list[str] = []
    if final_code != 0:
        problems.append(f"the last start failed (exit {final_code}): {final.last_stderr}")
    problems += [f"interruption {i}: the run hung after its signal" for i, a in
                 enumerate(attempts, 1) if a.hung]  # fmt: skip
    problems += compare_metrics(ref, work, steps)
    ckpt_problems, n_arrays = compare_checkpoints(ref, work, steps)
    problems += ckpt_problems
    tb_problems, n_tb = compare_event_files(ref, work)
    problems += tb_problems

    survived = [a for a in attempts[:-1] if not a.finished_first]
    logged = [r["step"] for r in _records(work)]
    lost = len(set(range(1, steps + 1)) - set(logged)) + (len(logged) - len(set(logged)))
    double = [a for a in survived if a.interruption and a.interruption.kind == "SIGINT+SIGINT"]
    report = {
        "ok": not problems,
        "problems": problems,
        "steps": steps,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "devices": devices,
        "scheduled": interruptions,
        "survived": len(survived),
        "by_kind": {k: sum(a.interruption.kind == k for a in survived) for k in KINDS},
        "inside_checkpoint_writes": sum(a.in_checkpoint_write for a in survived),
        "steps_redone": sum(a.redone for a in survived),
        "steps_lost_or_twice": lost,
        "arrays_compared": n_arrays,
        "event_file_dirs_compared": n_tb,
        "leftover_orbax_tmp_dirs": len(_tmp_dirs(work)),
        "max_exit_after_second_sigint_s": max(
            (a.exit_after_signal_s or 0.0 for a in double), default=None
        ),
        "timing": timing,
        "attempts": [
            {
                **dataclasses.asdict(a),
                "interruption": a.interruption and dataclasses.asdict(a.interruption),
            }
            for a in attempts
        ],  # fmt: skip
    }
    (run_dir / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    k = report["by_kind"]
    tb = (
        f", TensorBoard scalars of {report['event_file_dirs_compared']} run(s) identical"
        if report["event_file_dirs_compared"]
        else ", no TensorBoard event files written"
    )
    verdict = (
        f"final state ({report['arrays_compared']} arrays) and all {report['steps']} logged "
        f"steps bit-identical to the uninterrupted run{tb}"
        if report["ok"]
        else f"{len(report['problems'])} check(s) FAILED"
    )
    return (
        f"interruptions survived: {report['survived']} of {report['scheduled']} "
        f"({k['SIGKILL']} SIGKILL, {k['SIGTERM']} SIGTERM, {k['SIGINT+SIGINT']} double SIGINT; "
        f"{report['inside_checkpoint_writes']} during a checkpoint write); steps redone after "
        f"kills: {report['steps_redone']}; steps lost or logged twice: "
        f"{report['steps_lost_or_twice']}; {verdict}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = command_parser("python -m experiments.soak", __doc__)
    p.add_argument("--steps", type=positive_int, default=60, help="training steps of the run")
    p.add_argument(
        "--interruptions",
        type=int,
        default=20,
        help="how many times to interrupt the run (0 or more)",
    )
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the interruption schedule"
    )
    p.add_argument(
        "--checkpoint-every", type=positive_int, default=1, help="steps between checkpoints"
    )
    p.add_argument(
        "--devices", type=positive_int, default=8, help="simulated CPU devices of the runs"
    )
    p.add_argument(
        "--out",
        type=output_dir,
        default=None,
        help="run directory (default: a new runs/soak-<time>/)",
    )
    args = p.parse_args(argv)

    def body() -> int:
        if args.steps < 4:
            raise ValueError(f"--steps {args.steps} is too short to interrupt: use at least 4")
        if args.interruptions < 0:
            raise ValueError(f"--interruptions {args.interruptions} is negative: use 0 or more")
        if args.checkpoint_every > args.steps // 2:
            raise ValueError(
                f"--checkpoint-every {args.checkpoint_every} leaves fewer than 2 checkpoints in "
                f"{args.steps} steps: use at most {args.steps // 2}"
            )
        run_dir = create("soak", args.out)
        if any(run_dir.iterdir()):
            raise ValueError(f"--out {run_dir} is not empty: pass a new directory")
        try:
            report = soak(
                steps=args.steps,
                interruptions=args.interruptions,
                seed=args.seed,
                checkpoint_every=args.checkpoint_every,
                devices=args.devices,
                run_dir=run_dir,
            )
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            print(f"run directory: {run_dir}")
            return 1
        print(summary(report))
        for problem in report["problems"]:
            print(f"error: {problem}", file=sys.stderr)
        print(f"run directory: {run_dir}")
        return 0 if report["ok"] else 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
