"""The study's stages in order: pilot -> targets -> tuning -> seeds -> summary and fits.

:func:`run_study` runs a tuned study (the reduced or the full grid) by the protocol of
:mod:`experiments.study`; :func:`reproduce` is the main job: the committed study's seed runs
trained again at its chosen rates and compared with it cell by cell. Both return the record
that :mod:`experiments.study.report` turns into the Markdown report and the plot.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.configs import ConfigError
from experiments.common.grid import compile_cache
from experiments.study import protocol as P
from experiments.study.fitting import fit_cells, geometric_mean, interval, resampled_geomean
from experiments.study.harness import Study, StudyRun, is_locked, loss_locks, read_rows, say
from experiments.study.settings import StudySettings
from experiments.study.targets import choose_targets, margins, plateau
from experiments.study.tuning import choose, end_status, next_exponent

__all__ = ["run_study", "reproduce", "rerun_seeds", "summarise", "cell_steps", "committed_cells"]

WAIT_S, WAIT_LIMIT_S = 10.0, 24 * 3600.0


def _run(s: StudySettings, stage: str, loss: str, b: int, lr: float, seed: int, steps: int,
         stop_at: float | None) -> StudyRun:  # fmt: skip
    cfg = s.base(stop_at).with_updates(
        loss=loss, batch_size=b, learning_rate=lr, seed=seed, steps=steps, checkpoint_every=steps
    )
    return StudyRun(stage, loss, b, lr, seed, cfg)


def _after_warmup(step: float | None) -> int | None:
    """Steps after the warm-up (protocol item 3); a crossing inside it counts as one."""
    return None if step is None else max(1, int(step) - P.WARMUP_STEPS)


def cell_steps(row: dict, target: float) -> int | None:
    """Steps after the warm-up to ``target`` (None: censored at the cap)."""
    return _after_warmup(row["steps_to"].get(str(target)))


# --- 1. pilot -> targets --------------------------------------------------------------------
# The pilot trains its whole length: it "stops" at 0 nats, which no model reaches (the other
# captions' logits are bounded below by -1 / 0.05), and a target makes the loop evaluate the
# target's metric alone between full evaluations (the full ones score the test split too).
UNREACHABLE = 0.0


def _pilot_run(s: StudySettings, loss: str, b: int) -> StudyRun:
    return _run(s, "pilot", loss, b, P.rule_rate(b), P.PILOT_SEED, s.pilot_length(b), UNREACHABLE)


def pilots(s: StudySettings, study: Study) -> dict[tuple[str, int], dict]:
    """The pilot row of every (loss, B) of the study: this process trains its own losses'
    and waits for the other losses' (trained by another process on the same ``--out``)."""
    out: dict[tuple[str, int], dict] = {}
    for loss in s.run_losses:
        for b in s.batch_sizes:
            out[(loss, b)] = study.run(_pilot_run(s, loss, b))
    waited = 0.0
    for loss in s.losses:
        for b in s.batch_sizes:
            if (loss, b) in out:
                continue
            run = _pilot_run(s, loss, b)
            while not study.row_path(run).exists():
                if not is_locked(s.out, loss):
                    raise ConfigError(
                        f"the pilot of {loss} at B = {b} is not in {s.out} and no process is "
                        f"training it: start one with --run-losses {loss} on this --out"
                    )
                if waited == 0:
                    say(f"waiting for {loss}'s pilots (another process on this --out)")
                time.sleep(WAIT_S)
                waited += WAIT_S
                if waited > WAIT_LIMIT_S:
                    raise ConfigError(f"waited a day for {loss}'s pilots in {s.out}: giving up")
            out[(loss, b)] = json.loads(study.row_path(run).read_text())
    return out


def target_record(s: StudySettings, pilot_rows: dict[tuple[str, int], dict]) -> dict:
    """The plateaus, the targets the rule sets, every cell's margin and its cap."""
    cells = []
    for (loss, b), row in sorted(pilot_rows.items()):
        if row.get("error"):
            raise ConfigError(
                f"the pilot of {loss} at B = {b} failed ({row['error']}): the rule's rate must "
                "train; the protocol cannot set targets"
            )
        p = plateau(row["curve"], s.pilot_length(b))
        cells.append({"loss": loss, "batch_size": b, **p})
    chosen = choose_targets(cells)
    harder = min(chosen["targets"])
    for c in cells:
        row = pilot_rows[(c["loss"], c["batch_size"])]
        reached = next((st for st, v in row["curve"] if v <= harder), None)
        c["pilot_steps_to_harder"] = reached
        c["cap"] = P.cap_from_pilot(reached, s.pilot_length(c["batch_size"]))
    return {**chosen, "plateaus": cells, "margins": margins(cells, chosen["targets"])}


# --- 2. tuning -> chosen rates --------------------------------------------------------------
def tune(s: StudySettings, study: Study, loss: str, b: int, targets: Sequence[float],
         cap: int) -> list[dict]:  # fmt: skip
    """The tuning seed's rows of a cell, the grid extended until every choice is settled."""
    rows: list[dict] = []
    while (k := next_exponent(rows, targets, base=s.rate_exponents)) is not None:
        run = _run(s, "tune", loss, b, P.rate(b, k), P.TUNING_SEED, cap, min(targets))
        rows.append(study.run(run, exponent=k))
    return rows


def summarise(
    s_losses: Sequence[str],
    sizes: Sequence[int],
    targets: Sequence[float],
    tuning: dict[tuple[str, int], list[dict]],
    seed_rows: Sequence[dict],
    caps: dict[tuple[str, int], int],
) -> list[dict]:
    """Per (loss, B, target): the chosen rate, where it sits in its grid, the runner-up,
    every reported seed's steps after warm-up (None: censored) and their geometric mean with
    a seed-bootstrap 90 % interval; top-1 at the crossing as the second column."""
    rng = np.random.default_rng(0)
    out = []
    for loss in s_losses:
        for b in sizes:
            rows = tuning.get((loss, b), [])
            if not rows:
                continue
            picks, ends = choose(rows, targets), end_status(rows, targets)
            for t in targets:
                c = picks[str(t)]
                k = c["exponent"]
                seeds = sorted(
                    (r for r in seed_rows
                     if (r["loss"], r["batch_size"]) == (loss, b) and r.get("exponent") == k),
                    key=lambda r: r["seed"],
                )  # fmt: skip
                steps = [cell_steps(r, t) for r in seeds]
                done = [v for v in steps if v is not None]
                entry: dict[str, Any] = {
                    "loss": loss,
                    "batch_size": b,
                    "target": t,
                    "exponent": k,
                    "learning_rate": None if k is None else P.rate(b, k),
                    "grid": sorted(r["exponent"] for r in rows),
                    "end_status": ends[str(t)],
                    "tuning_steps": _after_warmup(c["steps"]),
                    "runner_up": None
                    if c["runner_up"] is None
                    else {
                        "exponent": c["runner_up"]["exponent"],
                        "steps": _after_warmup(c["runner_up"]["steps"]),
                    },
                    "seeds": [r["seed"] for r in seeds],
                    "steps": steps,
                    "censored": sum(v is None for v in steps),
                    "cap": caps[(loss, b)],
                    "top1_at_target": _top1_at(seeds, t),
                }
                if done and len(done) == len(steps):
                    entry["geomean"] = geometric_mean(done)
                    draws = [resampled_geomean(done, rng) for _ in range(P.BOOTSTRAP_RESAMPLES)]
                    entry["interval"] = interval(draws)
                elif steps:  # a lower bound: censored seeds at their cap
                    entry["lower_bound"] = geometric_mean(
                        [caps[(loss, b)] if v is None else v for v in steps]
                    )
                out.append(entry)
    return out


def _top1_at(rows: Sequence[dict], target: float) -> float | None:
    """Mean validation top-1 of ``rows`` at the evaluation where each reached ``target``."""
    vals = []
    for r in rows:
        step = r["steps_to"].get(str(target))
        top1 = dict(map(tuple, r.get("curves", {}).get(P.SECOND_METRIC, [])))
        if step is not None and step in top1:
            vals.append(top1[step])
    return sum(vals) / len(vals) if vals else None


def fits(summary: Sequence[dict], losses: Sequence[str], targets: Sequence[float]) -> list[dict]:
    """The log-space fit with intervals per (loss, target)."""
    out = []
    for loss in losses:
        for t in targets:
            cells = [
                {"batch_size": p["batch_size"], "steps": p["steps"], "cap": p["cap"]}
                for p in summary
                if p["loss"] == loss and p["target"] == t and p["steps"]
            ]
            out.append({"loss": loss, "target": t, **fit_cells(cells)})
    return out


# --- the whole study ------------------------------------------------------------------------
def run_study(s: StudySettings, record: dict[str, Any]) -> dict[str, Any]:
    """Pilot, targets, tuning and seeds for ``s.run_losses``; with every loss's rows present
    in ``s.out``, the summary and the fits. Returns the record (``complete`` False while
    other processes still train some losses)."""
    t0 = time.perf_counter()
    with loss_locks(s.out, s.run_losses), compile_cache(s.compile_cache or s.out / "compile_cache"):
        study = Study(s.out, P.METRIC, [])
        pilot_rows = pilots(s, study)
        tgt = target_record(s, pilot_rows)
        targets = tgt["targets"]
        study.targets = targets
        say(f"targets ({P.METRIC}, nats): {targets}, set by {tgt['binding']}")
        caps = {(c["loss"], c["batch_size"]): c["cap"] for c in tgt["plateaus"]}
        for loss in s.run_losses:
            for b in s.batch_sizes:
                rows = tune(s, study, loss, b, targets, caps[(loss, b)])
                for k in sorted({c["exponent"] for c in choose(rows, targets).values()} - {None}):
                    for seed in s.seeds:
                        run = _run(s, "seeds", loss, b, P.rate(b, k), seed, caps[(loss, b)],
                                   min(targets))  # fmt: skip
                        study.run(run, exponent=k)
    record.update(targets=tgt, call_time_s=round(time.perf_counter() - t0, 1))
    return collect(s, record, read_rows(s.out), tgt)


def _cell_done(s: StudySettings, tuned: list[dict], seeds: Sequence[dict], loss: str, b: int,
               targets: Sequence[float]) -> bool:  # fmt: skip
    """Whether a cell's grid is settled and every seed of every chosen rate has its row."""
    if not tuned or next_exponent(tuned, targets, base=s.rate_exponents) is not None:
        return False
    chosen = {c["exponent"] for c in choose(tuned, targets).values()} - {None}
    have = {(r["exponent"], r["seed"]) for r in seeds if (r["loss"], r["batch_size"]) == (loss, b)}
    return all((k, seed) in have for k in chosen for seed in s.seeds)


def collect(s: StudySettings, record: dict, rows: dict[str, dict], tgt: dict) -> dict:
    """The summary and fits from the rows of ``s.out`` (every loss's, whichever process
    trained it); ``complete`` says whether every cell of the study is finished (its grid
    settled, every seed of every chosen rate trained)."""
    targets = tgt["targets"]
    caps = {(c["loss"], c["batch_size"]): c["cap"] for c in tgt["plateaus"]}
    tuning: dict[tuple[str, int], list[dict]] = {}
    seeds = []
    for r in rows.values():
        if r["stage"] == "tune":
            tuning.setdefault((r["loss"], r["batch_size"]), []).append(r)
        elif r["stage"] == "seeds":
            seeds.append(r)
    summary = summarise(s.losses, s.batch_sizes, targets, tuning, seeds, caps)
    record.update(
        rows=sorted(rows.values(), key=lambda r: r["name"]),
        summary=summary,
        fits=fits(summary, s.losses, targets),
        complete=all(
            _cell_done(s, tuning.get((loss, b), []), seeds, loss, b, targets)
            for loss in s.losses
            for b in s.batch_sizes
        ),
        train_time_s=round(sum(r.get("train_s") or 0 for r in rows.values()), 1),
    )
    return record


# --- the main job ---------------------------------------------------------------------------
def committed_cells(path: str | os.PathLike, losses: Sequence[str], sizes: Sequence[int]) -> dict:
    """``{(loss, B): {learning_rate, exponent, cap, steps, target}}`` for the harder target
    from a finished study's JSON; ConfigError (one line) if it is not one of this protocol's
    or lacks a cell."""
    try:
        study = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--rates {path}: cannot read a study ({type(e).__name__})") from None
    if not isinstance(study, dict) or study.get("protocol_version") != P.VERSION:
        raise ConfigError(
            f"--rates {path} is not a tuned study of protocol version {P.VERSION} (the "
            "batch_size_study.json that --tune writes)"
        )
    if not study.get("complete"):
        raise ConfigError(f"--rates {path}: the study is not complete (some losses missing)")
    harder = min(study["targets"]["targets"])
    cells = {(p["loss"], p["batch_size"]): p for p in study["summary"] if p["target"] == harder}
    out = {}
    for loss in losses:
        for b in sizes:
            p = cells.get((loss, b))
            if p is None or p["learning_rate"] is None:
                have = sorted({bb for _, bb in cells})
                raise ConfigError(
                    f"--rates {path} has no chosen rate for {loss} at B = {b}: its batch "
                    f"sizes are {', '.join(map(str, have))}"
                )
            out[(loss, b)] = {**p, "target": harder}
    return {"cells": out, "study": study}


def rerun_seeds(s: StudySettings, committed: dict, rates_path: str) -> list[int]:
    """The seeds the main job trains again: ``--seeds``, or the protocol's
    ``MAIN_JOB_SEEDS`` that the committed study has; ConfigError (one line) for a seed the
    committed study did not run."""
    have = committed.get("seeds") or list(P.REPORTED_SEEDS)
    if s.main_seeds is None:
        return [x for x in P.MAIN_JOB_SEEDS if x in have] or list(have)
    missing = [x for x in s.main_seeds if x not in have]
    if missing:
        raise ConfigError(
            f"--seeds {missing[0]} is not a seed of the committed study ({rates_path} has "
            f"seeds {', '.join(map(str, have))}): rerun some of those"
        )
    return list(s.main_seeds)


def reproduce(s: StudySettings, rates_path: str, record: dict[str, Any]) -> dict[str, Any]:
    """The main job: the committed study's seeds at its chosen rates for the harder target,
    each cell compared with the committed one in units of their standard error."""
    got = committed_cells(rates_path, s.run_losses, s.batch_sizes)
    cells, committed = got["cells"], got["study"]
    target = min(committed["targets"]["targets"])
    seeds = rerun_seeds(s, committed, rates_path)
    t0 = time.perf_counter()
    with loss_locks(s.out, s.run_losses), compile_cache(s.compile_cache or s.out / "compile_cache"):
        study = Study(s.out, P.METRIC, [target])
        rows = []
        for loss in s.run_losses:
            for b in s.batch_sizes:
                c = cells[(loss, b)]
                for seed in seeds:
                    run = _run(s, "seeds", loss, b, c["learning_rate"], seed, c["cap"], target)
                    rows.append(study.run(run, exponent=c["exponent"]))
    comparison = []
    for (loss, b), c in cells.items():
        now = [cell_steps(r, target) for r in rows if (r["loss"], r["batch_size"]) == (loss, b)]
        # Seed by seed: on the committed study's machine and stack a run is bit-for-bit
        # deterministic, so its steps come out equal; elsewhere they part by the seeds' spread.
        same = dict(zip(c["seeds"], c["steps"], strict=True))
        comparison.append({"loss": loss, "batch_size": b, "learning_rate": c["learning_rate"],
                           "committed": c["steps"], "now": now,
                           "identical": [same[x] for x in seeds] == now,
                           **compare(c["steps"], now, c["cap"])})  # fmt: skip
    record.update(
        target=target,
        seeds=seeds,
        rows=rows,
        comparison=comparison,
        reproduces=all(x["within_noise"] for x in comparison),
        identical=all(x["identical"] for x in comparison),
        call_time_s=round(time.perf_counter() - t0, 1),
        train_time_s=round(sum(r.get("train_s") or 0 for r in rows), 1),
    )
    return record


def compare(committed: Sequence[int | None], now: Sequence[int | None], cap: int) -> dict:
    """The difference of two cells' mean log steps in units of its standard error
    (``z``); within noise when ``|z| <= 3``. Censored seeds count at the cap."""
    a = [math.log(cap if v is None else v) for v in committed]
    b = [math.log(cap if v is None else v) for v in now]

    def var(x: list[float]) -> float:
        return float(np.var(x, ddof=1)) if len(x) > 1 else 0.0

    se = math.sqrt(var(a) / len(a) + var(b) / len(b))
    diff = sum(b) / len(b) - sum(a) / len(a)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"ratio": math.exp(diff), "z": z, "within_noise": abs(z) <= 3.0}
