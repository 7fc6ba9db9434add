"""The gradient noise scale beside the critical batch size: does ``B_simple`` predict ``B_crit``?

McCandlish et al. 2018 (arXiv 1812.06162, §2.2-2.3) predict the fitted critical batch size
``B_crit = E_min / S_min`` by the simple noise scale ``B_simple = tr(Σ) / |G|²``, measured
during training. This stage measures ``B_simple`` with the fixed-batch estimator
(:func:`contrastive.measure.noise_scale.fixed_batch_noise_scale`: ``m`` independent batches of the
run's own ``B`` at fixed parameters, valid for a contrastive loss whose value depends on
``B``) on the committed study's own runs, and sets it beside the study's fitted ``B_crit``.

Its rules, fixed before any of its measurements (they were added to protocol version 2
after the steps-to-target grid had started, and change nothing in it):

1. **Where.** Each loss at ``NOISE_BATCH_SIZES`` (two sizes of the reduced grid, so that the
   meter's own check, ``B·V`` nearly constant in ``B``, is seen on the study's runs), the
   committed study's chosen rate for the harder target, the reported seeds 1-5.
2. **When.** Each run trains ``3K`` steps with ``K = ceil(T / 3)``, ``T`` the committed
   cell's geometric-mean steps to the harder target (warm-up included), and measures at
   steps ``K``, ``2K`` and ``3K``: *early*, *middle*, and *at the harder target*. The easier
   target is compared at the checkpoint nearest its own committed mean steps.
3. **Estimate.** ``m = NOISE_BATCHES`` (32) batches per measurement. ``B·V`` (the trace of
   the per-example covariance) and ``|G|²`` are averaged over the five seeds before dividing
   (a ratio of noisy estimates is biased); the 90 % interval resamples seeds (2,000 times)
   and divides each resample's means.
4. **Verdict** per (loss, target): ``B_simple`` predicts ``B_crit`` within 2× when its
   interval lies inside ``[B_crit_lo / 2, 2 B_crit_hi]`` (``B_crit``'s own 90 % interval);
   it does not when the two ranges are disjoint; otherwise, or where ``B_crit`` is only
   bounded, "not resolved at this precision".

Cost: ``3 · m`` extra gradients of batch ``B`` per run, no parameter update; the runs are
the study's own runs at its chosen rates, resumable like the rest (rows in ``--out``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from contrastive.configs import ConfigError
from experiments.common.cli import shared_module
from experiments.common.reports import loss_label
from experiments.study import protocol as P
from experiments.study.fitting import interval
from experiments.study.harness import Study, StudyRun, loss_locks
from experiments.study.settings import StudySettings

__all__ = ["NOISE_BATCH_SIZES", "NOISE_BATCHES", "PHASES", "schedule", "run_noise",
           "pooled", "summarise_noise", "verdict", "noise_markdown"]  # fmt: skip

NOISE_BATCH_SIZES = (256, 1024)
NOISE_BATCHES = 32  # m: independent batches per measurement
PHASES = ("early", "middle", "at the harder target")


def schedule(mean_steps_after_warmup: float) -> tuple[int, int]:
    """``(K, steps)``: measure every ``K`` steps of a ``3K``-step run, ``3K`` near the mean
    steps (warm-up included) to the harder target.

    >>> schedule(50.0)   # 60 steps with the warm-up: measurements at 20, 40, 60
    (20, 60)
    """
    total = mean_steps_after_warmup + P.WARMUP_STEPS
    k = max(1, math.ceil(total / len(PHASES)))
    return k, len(PHASES) * k


def _cells(study: dict, losses: Sequence[str], sizes: Sequence[int]) -> dict:
    """The committed cells ``{(loss, B): summary entry}`` at the harder target; ConfigError
    (one line) for a cell the study did not settle."""
    harder = min(study["targets"]["targets"])
    by = {(p["loss"], p["batch_size"]): p for p in study["summary"] if p["target"] == harder}
    out = {}
    for loss in losses:
        for b in sizes:
            p = by.get((loss, b))
            if p is None or p.get("learning_rate") is None:
                raise ConfigError(
                    f"the committed study has no chosen rate for {loss} at B = {b}: the noise "
                    "stage measures on its runs at that rate"
                )
            # A censored cell's steps are a lower bound: its runs measure up to that bound.
            out[(loss, b)] = {**p, "steps_mean": p.get("geomean") or p["lower_bound"]}
    return out


def run_noise(s: StudySettings, study: dict, record: dict[str, Any]) -> dict[str, Any]:
    """Train the stage's runs (or read them back) and summarise them into ``record``."""
    # The protocol's sizes; a toy study (its own --batch-sizes) measures at its own.
    sizes = s.batch_sizes if s.preset == "custom" else NOISE_BATCH_SIZES
    cells = _cells(study, s.run_losses, sizes)
    seeds = study.get("seeds") or list(P.REPORTED_SEEDS)  # the committed study's own
    t0 = time.perf_counter()
    rows = []
    with loss_locks(s.out, s.run_losses):
        runs = Study(s.out, P.METRIC, study["targets"]["targets"])
        for (loss, b), p in cells.items():
            k, steps = schedule(p["steps_mean"])
            for seed in seeds:
                cfg = s.base(None).with_updates(
                    loss=loss, batch_size=b, learning_rate=p["learning_rate"], seed=seed,
                    steps=steps, checkpoint_every=steps, noise_scale_every=k,
                    noise_batches=NOISE_BATCHES,
                )  # fmt: skip
                run = StudyRun("noise", loss, b, p["learning_rate"], seed, cfg)
                rows.append(runs.run(run, every=k))
    summary = summarise_noise(rows, cells)
    record.update(
        seeds=list(seeds),
        rows=rows,
        summary=summary,
        verdicts=[verdict(x, study) for x in _comparisons(summary, study)],
        call_time_s=round(time.perf_counter() - t0, 1),
    )
    return record


def pooled(traces: Sequence[float], g2s: Sequence[float], *, resamples: int = P.BOOTSTRAP_RESAMPLES,
           seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``B_simple`` from per-seed ``B·V`` and ``|G|²``: their means divided once, and the
    90 % seed-bootstrap interval of that ratio (None when ``|G|²``'s mean is not positive:
    the direction is not resolved from the noise).

    >>> r = pooled([100.0, 120.0, 80.0], [1.0, 1.2, 0.8], resamples=200)
    >>> r["b_simple"], [round(x, 6) for x in r["interval"]]  # every resample's ratio is 100
    (100.0, [100.0, 100.0])
    """
    tr, g2 = np.asarray(traces, np.float64), np.asarray(g2s, np.float64)
    b_simple = float(tr.mean() / g2.mean()) if g2.mean() > 0 else None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        i = rng.integers(0, len(tr), size=len(tr))
        g = g2[i].mean()
        draws.append(tr[i].mean() / g if g > 0 else math.inf)
    return {
        "b_simple": b_simple,
        "trace": float(tr.mean()),
        "g2": float(g2.mean()),
        "interval": interval(draws) if b_simple is not None else None,
        "seeds": len(tr),
    }


def summarise_noise(rows: Sequence[dict], cells: dict) -> list[dict]:
    """Per (loss, B, phase): the step, ``B·V`` and ``|G|²`` pooled over seeds, ``B_simple``
    with its interval."""
    out = []
    for (loss, b), p in cells.items():
        mine = [r for r in rows if (r["loss"], r["batch_size"]) == (loss, b)]
        for i, phase in enumerate(PHASES):
            got = [r["noise"][i] for r in mine if len(r.get("noise", [])) > i]
            if len(got) < 2:
                continue
            out.append({
                "loss": loss, "batch_size": b, "phase": phase, "step": got[0]["step"],
                "committed_steps": p["steps_mean"],
                **pooled([g["trace"] for g in got], [g["g2"] for g in got]),
            })  # fmt: skip
    return out


def _comparisons(summary: Sequence[dict], study: dict) -> list[dict]:
    """Per (loss, target, B): the measurement at the checkpoint nearest the target's
    committed mean steps (warm-up included), beside that target's fit."""
    fits = {(f["loss"], f["target"]): f for f in study["fits"]}
    cells = {(p["loss"], p["batch_size"], p["target"]): p for p in study["summary"]}
    out = []
    for (loss, target), fit in sorted(fits.items()):
        for b in sorted({x["batch_size"] for x in summary if x["loss"] == loss}):
            mine = [x for x in summary if (x["loss"], x["batch_size"]) == (loss, b)]
            cell = cells.get((loss, b, target))
            if not mine or cell is None or cell.get("geomean") is None:
                continue  # a censored cell has no steps to compare a checkpoint with
            at = cell["geomean"] + P.WARMUP_STEPS
            m = min(mine, key=lambda x: abs(x["step"] - at))
            out.append({"loss": loss, "target": target, "batch_size": b, "measure": m,
                        "fit": fit})  # fmt: skip
    return out


def verdict(c: dict, study: dict | None = None) -> dict[str, Any]:
    """Rule 4: within 2x, not within 2x, or not resolved."""
    m, fit = c["measure"], c["fit"]
    iv, biv = m.get("interval"), fit.get("b_crit_interval")
    if iv is None or biv is None or fit.get("b_crit_bound") or not math.isfinite(iv[1]):
        answer = "not resolved at this precision"
    elif biv[0] / 2 <= iv[0] and iv[1] <= 2 * biv[1]:
        answer = "within 2x"
    elif iv[1] < biv[0] / 2 or iv[0] > 2 * biv[1]:
        answer = "not within 2x"
    else:
        answer = "not resolved at this precision"
    return {"loss": c["loss"], "target": c["target"], "batch_size": c["batch_size"],
            "phase": m["phase"], "b_simple": m["b_simple"], "b_simple_interval": iv,
            "b_crit": fit.get("b_crit"), "b_crit_interval": biv,
            "b_crit_bound": fit.get("b_crit_bound"), "answer": answer}  # fmt: skip


def _iv(iv: Sequence[float] | None) -> str:
    return "-" if iv is None else f"[{iv[0]:.3g}, {iv[1]:.3g}]"


def noise_markdown(record: dict) -> str:
    """The stage's report: the measurements, then B_simple beside B_crit with the verdicts."""
    lines = [
        "## The gradient noise scale beside the critical batch size",
        "",
        f"Fixed-batch estimator, m = {NOISE_BATCHES} batches of the run's own B per "
        f"measurement, at steps K, 2K, 3K of the committed study's runs (K = a third of the "
        f"cell's mean steps to the harder target, warm-up included), seeds "
        f"{', '.join(map(str, record['seeds']))}; B·V and |G|² averaged over seeds before "
        "dividing; 90 % seed-bootstrap intervals. Rules: `experiments/study/noise_scale.py`.",
        "",
        "| loss | batch | checkpoint | step | B·V | abs(G)² | B_simple [90 %] |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for x in record["summary"]:
        b_simple = "-" if x["b_simple"] is None else f"{x['b_simple']:.3g}"
        lines.append(
            f"| {loss_label(x['loss'])} | {x['batch_size']} | {x['phase']} | {x['step']} | "
            f"{x['trace']:.3g} | {x['g2']:.3g} | {b_simple} {_iv(x['interval'])} |"
        )
    lines += ["", "| loss | target | B measured | checkpoint | B_simple [90 %] | "
              "B_crit [90 %] | within 2x? |", "|---|---:|---:|---|---|---|---|"]  # fmt: skip
    for v in record["verdicts"]:
        crit = "-" if v["b_crit"] is None else f"{v['b_crit']:.3g} {_iv(v['b_crit_interval'])}"
        if v["b_crit_bound"]:
            crit = f"{v['b_crit_bound']['side']} {v['b_crit_bound']['batch_size']} (bound only)"
        b_simple = "-" if v["b_simple"] is None else f"{v['b_simple']:.3g}"
        lines.append(
            f"| {loss_label(v['loss'])} | {v['target']:g} | {v['batch_size']} | {v['phase']} | "
            f"{b_simple} {_iv(v['b_simple_interval'])} | {crit} | {v['answer']} |"
        )
    answers = ("within 2x", "not within 2x", "not resolved at this precision")
    counts = {a: sum(v["answer"] == a for v in record["verdicts"]) for a in answers}
    lines += ["", "**Verdict:** " + "; ".join(f"{n} {a}" for a, n in counts.items()) + " (of "
              f"{len(record['verdicts'])} comparisons)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
