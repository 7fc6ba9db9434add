"""Small batches that optimise the global objective: SogCLR and iSogCLR against InfoNCE.

Yuan et al. (ICML 2022, arXiv 2202.12387, "Small Batch Does Not Harm Performance") replace
the mini-batch InfoNCE gradient, whose bias shrinks only with ``B``, by one that tracks the
global contrastive objective through a moving average ``u_i`` per example (SogCLR); Qiu et
al. (ICML 2023, arXiv 2305.11965) add a learned temperature per example (iSogCLR). This
stage asks their question in the study's regime (``--loss global-infonce``,
:mod:`contrastive.step.example_states`): at small batches, do they need fewer steps to the
study's targets than InfoNCE at the same ``B``, than a negative queue, and as few as
InfoNCE at a larger ``B``; and where do they end after a fixed budget of examples?

Its rules, fixed on 2026-12-07 before any of its runs:

1. **Regime and metric.** The committed study's (protocol version 2, :mod:`experiments.study`):
   ``shapes`` with the locked image tower, validation zero-shot cross-entropy, its two
   targets (3.0 and 3.5 nats), steps counted after the 10 warm-up steps.
2. **Arms**, at ``B`` = 64 and 256 (:data:`ARM_SIZES`):
   ``infonce`` (random batches); ``queue`` (InfoNCE with a negative queue of ``K = 1024 / B
   - 1`` steps, so that every anchor meets 1,024 candidates, MoCo's queue without its
   momentum encoder); ``sogclr`` (``--loss global-infonce``, ``γ = 0.9`` and a fixed
   ``τ = 0.1``, the paper's); ``isogclr`` (``--individual-temperature``,
   ``ρ = 1``, ``η_τ = 0.02``, ``τ_i ∈ [0.01, 1]``). Why ``ρ = 1``: the temperature's
   gradient is ``G_i = H(p_i) − log N_i + ρ`` (``p_i`` the softmax over anchor ``i``'s
   ``N_i`` negatives, ``H`` its entropy), never above ``ρ``; at ``ρ = 0`` every ``τ_i``
   climbs to its upper bound, and ``ρ = 1`` balances it where the softmax spreads over
   ``N_i / e`` negatives. Why ``η_τ = 0.02``: each ``τ_i`` moves once per epoch, 4 times in
   the budget; at the library's ``1e-3`` it could not move more than ``0.004``. Neither is
   tuned. Amended the same day: SogCLR's first runs learned the global temperature (the
   study's setting), which grew without bound, 0.1 to 28,000 in 2,700 steps (final top-1
   17 %): at ``ρ = 0`` the objective ``τ log ĝ_i`` falls as ``τ`` rises (the same gradient,
   ``H(p_i) − log N_i ≤ 0``). Those runs were discarded, SogCLR's ``τ`` fixed as in the paper,
   and the library now refuses a learned temperature at ``ρ = 0``.
3. **Rates.** ``infonce``: the committed study's chosen rate for the harder target. Every
   other arm at each ``B``: the study's rule on the tuning seed 0 (``2^k`` times
   ``4e-3 sqrt(B / 256)``, ``k = -4 .. 2``, the grid extended while the choice sits at an
   end; the fewest steps to the harder target; runs capped at the committed InfoNCE
   cell's cap). Added the same day, after the queue at ``B = 64`` missed the harder
   target at every rate of its tuning grid and before any of its seed runs: where no rate
   reaches the harder target, the rate is chosen for the easier one (the report says so);
   where none reaches either, the arm is left out at that ``B``.
4. **Seeds and budget.** Seeds 1-5 (never 0) train every arm at its rate for a fixed budget
   of ``E = 262,144`` examples (4 epochs of the 65,536): ``E / B`` steps, 4,096 at
   ``B = 64``, 1,024 at 256; InfoNCE also at ``B = 1,024`` (256 steps, the committed rate),
   the large batch of the comparison. Evaluations at ``ceil(1.05^k)``: the steps to each
   target are the curve's first crossing; the final evaluation scores the test split.
5. **Figures.** Per (arm, ``B``, target): the geometric mean of the seeds' steps with a
   90 % seed-bootstrap interval (the study's small-sample-corrected one), the examples
   (steps times ``B``), and the InfoNCE batch size with as many steps (log-log
   interpolation on the committed study's seed means, B = 64 .. 4,096; a bound outside).
   Per (arm, ``B``): the final test zero-shot top-1, mean with a 90 % seed-bootstrap
   interval, and the InfoNCE batch size with that accuracy (on this stage's InfoNCE runs
   at 64, 256 and 1,024, linear in ``log B``; a bound outside).
6. **Verdicts**, only where 90 % intervals separate: each arm against InfoNCE at the same
   ``B`` (steps, final accuracy); each arm against InfoNCE at ``B = 1,024`` (final
   accuracy); and the line on "small batch does not harm": SogCLR at ``B`` matches the
   large batch when its accuracy interval is not below InfoNCE's at 1,024 *and* InfoNCE at
   ``B`` is below it (a gap that SogCLR closes); the report says which part holds.

Cost: ``global-infonce`` keeps one float per example and direction (``u``), iSogCLR one more
(``τ_i``); about 20 % more time per step at these sizes (the gather and scatter of the
batch's rows), measured in the rows' ``train_s``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from contrastive.configs import ConfigError
from contrastive.step.negative_queue import check_queue_length
from experiments.common.cli import shared_module
from experiments.study import protocol as P
from experiments.study.arms import matched_batch
from experiments.study.fitting import (
    geometric_mean,
    interval,
    resampled_geomean,
    small_sample_scale,
)
from experiments.study.harness import Study, StudyRun
from experiments.study.settings import StudySettings
from experiments.study.steps_to_target import cell_steps
from experiments.study.tuning import choose, end_status, next_exponent

# The report (small_batches_markdown, headline): experiments.study.small_batches_report.
__all__ = ["ARMS", "ARM_SIZES", "stage_sizes", "BUDGET_EXAMPLES", "LARGE_BATCH", "arm_settings",
           "check_small_batches", "run_small_batches", "summarise_arms", "accuracy_match",
           "verdicts"]  # fmt: skip

ARMS = ("infonce", "queue", "sogclr", "isogclr")
ARM_SIZES = (64, 256)
LARGE_BATCH = 1024  # InfoNCE's large batch at the budget
BUDGET_EXAMPLES = 262_144  # 4 epochs of the 65,536 training examples
QUEUE_NEGATIVES = 1024  # B (1 + K): candidates per anchor in the queue arm
SOGCLR = {"learn_temperature": False, "temperature": 0.1}  # the paper's fixed τ
ISOGCLR = {"individual_temperature": True, "rho": 1.0, "temperature_lr": 0.02}
CHECKPOINT_EVERY = 500
ACCURACY = "zero_shot_top1"  # the final test metric compared
ARM_LABELS = {"infonce": "InfoNCE", "queue": "InfoNCE + queue", "sogclr": "SogCLR",
              "isogclr": "iSogCLR"}  # fmt: skip


def arm_settings(arm: str, batch_size: int, queue_negatives: int = QUEUE_NEGATIVES
                 ) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """``(loss, config updates)`` of ``arm`` at ``batch_size``.

    >>> arm_settings("queue", 64)
    ('infonce', {'negative_queue': 15})
    >>> arm_settings("isogclr", 256)[0]
    'global-infonce'
    """
    if arm == "infonce":
        return "infonce", {}
    if arm == "queue":
        return "infonce", {"negative_queue": queue_negatives // batch_size - 1}
    if arm == "sogclr":
        return "global-infonce", dict(SOGCLR)
    if arm == "isogclr":
        return "global-infonce", dict(ISOGCLR)
    raise ConfigError(f"unknown arm {arm!r}: use {', '.join(ARMS)}")


def stage_sizes(s: StudySettings) -> tuple[tuple[int, ...], int]:
    """``(arm batch sizes, InfoNCE's large batch)``: the protocol's, or for a toy study
    (``--batch-sizes``) all of its sizes but the largest, and the largest."""
    if s.preset != "custom":
        return ARM_SIZES, LARGE_BATCH
    if len(s.batch_sizes) < 2:
        raise ConfigError("--small-batches with --batch-sizes: give two or more (the arms' and "
                          "the large batch, the largest)")  # fmt: skip
    return tuple(s.batch_sizes[:-1]), s.batch_sizes[-1]


def check_small_batches(arms: Sequence[str], sizes: Sequence[int], train_examples: int,
                        budget: int) -> None:  # fmt: skip
    """Every arm can run at every size within the budget; ConfigError (one line) if not."""
    if not arms:
        raise ConfigError(f"--small-batch-arms: give at least one of {', '.join(ARMS)}")
    for arm in arms:
        if arm not in ARMS:
            raise ConfigError(f"--small-batch-arms: unknown arm {arm!r}: use {', '.join(ARMS)}")
    for b in sizes:
        if budget % b:
            raise ConfigError(f"--budget-examples {budget} is not a multiple of B = {b}")
        if "queue" in arms:
            if QUEUE_NEGATIVES % b or b >= QUEUE_NEGATIVES:
                raise ConfigError(f"the queue arm needs B dividing {QUEUE_NEGATIVES} and below "
                                  f"it; B = {b} is not")  # fmt: skip
            try:
                check_queue_length(QUEUE_NEGATIVES // b - 1, b, train_examples)
            except ValueError as e:
                raise ConfigError(f"the queue arm at B = {b}: {e}") from None


def _committed(study: dict, b: int) -> dict:
    """The committed InfoNCE cell at ``b`` for the harder target (rate and cap)."""
    harder = min(study["targets"]["targets"])
    for p in study["summary"]:
        if (p["loss"], p["batch_size"], p["target"]) == ("infonce", b, harder):
            if p.get("learning_rate") is None:
                break
            return p
    raise ConfigError(f"the committed study has no InfoNCE rate at B = {b} for its harder "
                      "target: this stage reads it")  # fmt: skip


def _run(s: StudySettings, stage: str, arm: str, b: int, lr: float, seed: int, steps: int,
         stop_at: float | None) -> StudyRun:  # fmt: skip
    loss, updates = arm_settings(arm, b)
    every = steps if stop_at is not None else min(steps, CHECKPOINT_EVERY)
    cfg = s.base(stop_at).with_updates(loss=loss, batch_size=b, learning_rate=lr, seed=seed,
                                       steps=steps, checkpoint_every=every, **updates)  # fmt: skip
    return StudyRun(f"{stage}-{arm}", loss, b, lr, seed, cfg)


def _tune(s: StudySettings, study: Study, arm: str, b: int, targets: Sequence[float],
          cap: int) -> list[dict]:  # fmt: skip
    rows: list[dict] = []
    while (k := next_exponent(rows, targets, base=s.rate_exponents)) is not None:
        run = _run(s, "tune", arm, b, P.rate(b, k), P.TUNING_SEED, cap, min(targets))
        rows.append(study.run(run, exponent=k, arm=arm))
    return rows


def _chosen(arm: str, b: int, rows: Sequence[dict], targets: Sequence[float]) -> dict:
    """Rule 3's choice: the rate with the fewest steps to the harder target; where no rate
    reached it, to the easier one (said in the report); where none reached either, no rate
    (the arm is left out at that ``B``, and the report says so)."""
    for t in sorted(targets):
        k = choose(rows, [t])[str(t)]["exponent"]
        if k is not None:
            return {"learning_rate": P.rate(b, k), "exponent": k, "from": "tuned",
                    "chosen_for": t, "grid": sorted(r["exponent"] for r in rows),
                    "end_status": end_status(rows, [t])[str(t)]}  # fmt: skip
    return {"learning_rate": None, "from": "tuned", "grid": sorted(r["exponent"] for r in rows),
            "chosen_for": None}  # fmt: skip


def run_small_batches(s: StudySettings, committed: dict, arms: Sequence[str], budget: int,
                      record: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Tune the arms' rates, train the seeds at the budget (or read them back), summarise."""
    targets = committed["targets"]["targets"]
    sizes, large = stage_sizes(s)
    check_small_batches(arms, sizes, s.train_examples, budget)
    if budget % large:
        raise ConfigError(f"--budget-examples {budget} is not a multiple of B = {large}")
    cells = {b: _committed(committed, b) for b in sorted({*sizes, large})}
    t0 = time.perf_counter()
    study = Study(s.out, P.METRIC, targets)
    rates: dict[tuple[str, int], dict[str, Any]] = {}
    tuning: list[dict] = []
    for arm in arms:
        for b in sizes:
            if arm == "infonce":
                rates[(arm, b)] = {"learning_rate": cells[b]["learning_rate"], "from": "committed"}
                continue
            cap = cells[b]["cap"]  # the committed InfoNCE cell's (its pilot's rule)
            for t in sorted(targets):  # the harder first; the easier only if it was missed
                rows = _tune(s, study, arm, b, [t], cap)  # (runs done already are read back)
                if choose(rows, [t])[str(t)]["exponent"] is not None:
                    break
            tuning += rows
            rates[(arm, b)] = _chosen(arm, b, rows, targets)
    skipped = {k: r for k, r in rates.items() if r.get("learning_rate") is None}
    rates = {k: r for k, r in rates.items() if k not in skipped}
    if "infonce" in arms:
        rates[("infonce", large)] = {"learning_rate": cells[large]["learning_rate"],
                                     "from": "committed"}  # fmt: skip
    rows = []
    for seed in s.seeds:
        for (arm, b), r in rates.items():
            run = _run(s, "budget", arm, b, r["learning_rate"], seed, budget // b, None)
            rows.append(study.run(run, arm=arm))
    summary = summarise_arms(rows, targets)
    curve = _committed_curve(committed, targets)
    matches = {t: {(p["arm"], p["batch_size"]): _steps_match(curve.get(t), p["steps"][t])
                   for p in summary} for t in map(str, targets)}  # fmt: skip
    acc = accuracy_match(summary)
    record.update(
        arms=list(arms), batch_sizes=list(sizes), large_batch=large, budget_examples=budget,
        targets=list(targets), seeds=list(s.seeds), isogclr=ISOGCLR,
        queue_negatives=QUEUE_NEGATIVES,
        rates=[{"arm": a, "batch_size": b, **r} for (a, b), r in rates.items()],
        left_out=[{"arm": a, "batch_size": b, **r} for (a, b), r in skipped.items()],
        tuning=tuning, rows=rows, summary=summary, committed_curve=curve,
        steps_matches=[{"target": float(t), "arm": a, "batch_size": b, "matched_batch": m}
                       for t, ms in matches.items() for (a, b), m in ms.items()],
        accuracy_matches=[{"arm": a, "batch_size": b, "matched_batch": m}
                          for (a, b), m in acc.items()],
        verdicts=verdicts(summary, sizes, large, targets),
        call_time_s=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    return record


def _committed_curve(committed: dict, targets: Sequence[float]) -> dict[str, list]:
    """Per target: the committed study's InfoNCE ``[B, geometric-mean steps]`` points."""
    out: dict[str, list] = {}
    for t in targets:
        out[str(t)] = sorted(
            [p["batch_size"], p["geomean"]] for p in committed["summary"]
            if p["loss"] == "infonce" and p["target"] == t and p.get("geomean")
        )  # fmt: skip
    return out


def _steps_match(curve: Sequence | None, steps: dict | None) -> Any:
    if not curve or len(curve) < 2 or steps is None or steps.get("geomean") is None:
        return None
    return matched_batch([b for b, _ in curve], [s for _, s in curve], steps["geomean"])


def _mean_interval(values: Sequence[float], rng: np.random.Generator) -> tuple[float, float]:
    """90 % seed-bootstrap interval of a mean, with the study's small-sample correction."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if n < 2:
        return float(v.mean()), float(v.mean())
    scale = small_sample_scale(n)
    draws = [v.mean() + scale * (v[rng.integers(0, n, size=n)].mean() - v.mean())
             for _ in range(P.BOOTSTRAP_RESAMPLES)]  # fmt: skip
    return interval(draws)


def summarise_arms(rows: Sequence[dict], targets: Sequence[float]) -> list[dict]:
    """Per (arm, B): the rate, the seeds, per target the steps after warm-up (geometric mean
    and interval; ``missed``: seeds that never reached it within the budget) and examples,
    and the final test accuracy (mean and interval)."""
    rng = np.random.default_rng(0)
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["batch_size"]), []).append(r)
    out = []
    for (arm, b), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"arm": arm, "loss": rs[0]["loss"], "batch_size": b,
                                 "learning_rate": rs[0]["learning_rate"],
                                 "seeds": [r["seed"] for r in rs],
                                 "failed": [r["seed"] for r in rs if r.get("error")],
                                 "steps": {}}  # fmt: skip
        for t in targets:
            each = [None if r.get("error") else cell_steps(r, t) for r in rs]
            done = [v for v in each if v is not None]
            st: dict[str, Any] = {"values": each, "missed": len(each) - len(done)}
            if done and len(done) == len(each):
                st["geomean"] = geometric_mean(done)
                st["interval"] = interval(
                    [resampled_geomean(done, rng) for _ in range(P.BOOTSTRAP_RESAMPLES)]
                )
                st["examples"] = st["geomean"] * b
            entry["steps"][str(t)] = st
        acc = [r.get(ACCURACY) for r in rs if r.get(ACCURACY) is not None]
        if acc:
            entry["accuracy"] = {"mean": float(np.mean(acc)), "values": acc,
                                 "interval": _mean_interval(acc, rng)}  # fmt: skip
        train_s = [r["train_s"] for r in rs if r.get("train_s")]
        if train_s:
            entry["train_s_per_step"] = float(np.median(train_s)) / (rs[0].get("cap") or 1)
        out.append(entry)
    return out


def accuracy_match(summary: Sequence[dict]) -> dict[tuple[str, int], Any]:
    """Per (arm, B): the InfoNCE batch size with the arm's final accuracy, linear in
    ``log B`` between this stage's InfoNCE seed means (a bound outside their range; None
    without two InfoNCE sizes).

    >>> s = [{"arm": "infonce", "batch_size": b, "accuracy": {"mean": a}}
    ...      for b, a in [(64, 0.2), (256, 0.3), (1024, 0.4)]]
    >>> s.append({"arm": "sogclr", "batch_size": 64, "accuracy": {"mean": 0.35}})
    >>> round(accuracy_match(s)[("sogclr", 64)])
    512
    """
    pts = sorted((p["batch_size"], p["accuracy"]["mean"]) for p in summary
                 if p["arm"] == "infonce" and p.get("accuracy"))  # fmt: skip
    out: dict[tuple[str, int], Any] = {}
    for p in summary:
        if p["arm"] == "infonce" or not p.get("accuracy") or len(pts) < 2:
            continue
        a = p["accuracy"]["mean"]
        best = max(pts, key=lambda x: x[1])
        worst = min(pts, key=lambda x: x[1])
        if a > best[1]:
            out[(p["arm"], p["batch_size"])] = {"batch": None, "bound": ">", "of": best[0]}
            continue
        if a < worst[1]:
            out[(p["arm"], p["batch_size"])] = {"batch": None, "bound": "<", "of": worst[0]}
            continue
        found = None
        for (b0, a0), (b1, a1) in zip(pts, pts[1:], strict=False):
            if min(a0, a1) <= a <= max(a0, a1):
                w = 0.0 if a0 == a1 else (a - a0) / (a1 - a0)
                found = math.exp(math.log(b0) + w * (math.log(b1) - math.log(b0)))
        out[(p["arm"], p["batch_size"])] = found
    return out


def _compare(a: dict | None, b: dict | None, lower: bool) -> str | None:
    """``better``/``worse`` where the 90 % intervals separate (``lower``: fewer is better)."""
    if not a or not b or a.get("interval") is None or b.get("interval") is None:
        return None
    (alo, ahi), (blo, bhi) = a["interval"], b["interval"]
    if ahi < blo:
        return "better" if lower else "worse"
    if alo > bhi:
        return "worse" if lower else "better"
    return "not resolved"


def verdicts(summary: Sequence[dict], sizes: Sequence[int], large: int,
             targets: Sequence[float]) -> list[dict]:  # fmt: skip
    """Rule 6's comparisons, each with its answer (``better``, ``worse``, ``not resolved``)."""
    cell = {(p["arm"], p["batch_size"]): p for p in summary}
    out = []
    for b in sizes:
        base = cell.get(("infonce", b))
        for arm in ("queue", "sogclr", "isogclr"):
            p = cell.get((arm, b))
            if p is None or base is None:
                continue
            for t in map(str, targets):
                out.append(
                    {
                        "what": "steps",
                        "target": float(t),
                        "arm": arm,
                        "batch_size": b,
                        "against": f"InfoNCE at B = {b}",
                        "answer": _compare(p["steps"][t], base["steps"][t], lower=True),
                    }
                )
            out.append(
                {
                    "what": "accuracy",
                    "arm": arm,
                    "batch_size": b,
                    "against": f"InfoNCE at B = {b}",
                    "answer": _compare(p.get("accuracy"), base.get("accuracy"), lower=False),
                }
            )
        big = cell.get(("infonce", large))
        for arm in ("infonce", "queue", "sogclr", "isogclr"):
            p = cell.get((arm, b))
            if p is None or big is None:
                continue
            out.append(
                {
                    "what": "accuracy",
                    "arm": arm,
                    "batch_size": b,
                    "against": f"InfoNCE at B = {large}",
                    "answer": _compare(p.get("accuracy"), big.get("accuracy"), lower=False),
                }
            )
    return [v for v in out if v["answer"] is not None]  # fmt: skip


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
