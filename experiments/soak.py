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
directory (``--out``), and exits 1 if any check fails. This module is the command (its
training command, the reference run, the report); starting and interrupting a run is
:mod:`experiments.common.soak_runs`, the comparisons :mod:`experiments.common.soak_checks`.

    python -m experiments.soak                          # 20 interruptions, ~10 CPU-minutes
    python -m experiments.soak --steps 16 --interruptions 4 --seed 1
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
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
from experiments.common.soak_checks import (
    compare_checkpoints,
    compare_event_files,
    compare_metrics,
    records,
)
from experiments.common.soak_runs import (
    KINDS,
    Attempt,
    Interruption,
    StartedRun,
    describe,
    finish_attempt,
    interrupt,
    logged_steps,
    schedule,
    tmp_dirs,
)

# What the tests and other callers read here; the machinery is in experiments.common.soak_*.
__all__ = [
    "KINDS",
    "compare_checkpoints",
    "compare_event_files",
    "compare_metrics",
    "schedule",
    "soak",
    "summary",
    "main",
]


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
    run = StartedRun(cmd, env, workdir, logs)
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
    attempts = _interrupted_starts(
        train_command(work, data_dir, **kw), env, work, logs, plan, steps, timing, log
    )
    report = _report(ref, work, attempts, timing, steps=steps, seed=seed,
                     checkpoint_every=checkpoint_every, devices=devices,
                     scheduled=interruptions)  # fmt: skip
    (run_dir / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _interrupted_starts(
    cmd: list[str],
    env: dict[str, str],
    work: Path,
    logs: Path,
    plan: list[Interruption],
    steps: int,
    timing: dict[str, float],
    log,
) -> list[Attempt]:
    """Start ``cmd`` and interrupt it as ``plan`` says, then start it once more to the end:
    an :class:`Attempt` per start, the last one uninterrupted (``interruption`` None)."""
    attempts: list[Attempt] = []
    for i, it in enumerate(plan, 1):
        run = StartedRun(cmd, env, work, logs / f"attempt{i:03d}")
        a = finish_attempt(interrupt(run, it, steps, timing), run)
        attempts.append(a)
        log("  " + describe(i, len(plan), a))
        if a.finished_first:
            break
    run = StartedRun(cmd, env, work, logs / "final")
    final_code = run.wait(1800.0)
    if final_code is None:
        run.send(signal.SIGKILL)
        run.wait(60.0)
    attempts.append(finish_attempt(Attempt(None, exit_code=final_code), run))
    return attempts


def _report(
    ref: Path,
    work: Path,
    attempts: list[Attempt],
    timing: dict[str, float],
    *,
    steps: int,
    scheduled: int,
    **settings: int,
) -> dict[str, Any]:
    """The soak's report: every check of the soaked run ``work`` against ``ref``, and counts."""
    final = attempts[-1]
    problems: list[str] = []
    if final.exit_code != 0:
        problems.append(f"the last start failed (exit {final.exit_code}): {final.last_stderr}")
    problems += [f"interruption {i}: the run hung after its signal" for i, a in
                 enumerate(attempts, 1) if a.hung]  # fmt: skip
    problems += compare_metrics(ref, work, steps)
    ckpt_problems, n_arrays = compare_checkpoints(ref, work, steps)
    problems += ckpt_problems
    tb_problems, n_tb = compare_event_files(ref, work)
    problems += tb_problems

    survived = [a for a in attempts[:-1] if not a.finished_first]
    logged = [r["step"] for r in records(work)]
    lost = len(set(range(1, steps + 1)) - set(logged)) + (len(logged) - len(set(logged)))
    double = [a for a in survived if a.interruption and a.interruption.kind == "SIGINT+SIGINT"]
    return {
        "ok": not problems,
        "problems": problems,
        "steps": steps,
        "seed": settings["seed"],
        "checkpoint_every": settings["checkpoint_every"],
        "devices": settings["devices"],
        "scheduled": scheduled,
        "survived": len(survived),
        "by_kind": {k: sum(a.interruption.kind == k for a in survived) for k in KINDS},
        "inside_checkpoint_writes": sum(a.in_checkpoint_write for a in survived),
        "steps_redone": sum(a.redone for a in survived),
        "steps_lost_or_twice": lost,
        "arrays_compared": n_arrays,
        "event_file_dirs_compared": n_tb,
        "leftover_orbax_tmp_dirs": len(tmp_dirs(work)),
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
