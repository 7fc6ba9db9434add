"""An adaptive batch size against the best fixed one: steps and examples to the study's targets.

McCandlish et al. (2018, arXiv 1812.06162, §5) suggest growing the batch as the gradient
noise scale ``B_simple`` grows during training. ``--adaptive-batch``
(:mod:`contrastive.run.adaptive_batch`) does that: every ``K`` steps the fixed-batch meter
measures ``B_simple`` at the run's batch size, and the batch doubles (in powers of 2, up to
``--max-batch-size``) while ``B_simple >= factor x B``, the learning rate following the
square-root rule. This stage measures it with the study's protocol.

Its rules, fixed on 2026-12-07 before any of its runs:

1. **Regime** as the committed study's (protocol version 2): InfoNCE (:data:`LOSSES`), its
   two targets, validation zero-shot cross-entropy, steps after the 10 warm-up steps.
2. **Arms.** Start at ``B0 = 64`` with the committed rate for the harder target at 64,
   ``--max-batch-size 4096`` (the grid's largest), the learning rate times
   ``sqrt(B / B0)`` after a growth, ``B_simple`` measured every ``K = 10`` steps (the first
   at the end of the warm-up) from ``m = 32`` batches. Two growth factors: **1**, McCandlish
   et al.'s prediction ``B_crit ≈ B_simple``; and **1/8**, calibrated on this study's own
   noise stage (``B_simple`` 5-10x below the fitted ``B_crit`` for InfoNCE), so *not* an
   independent test.
3. **Seeds** 1-5, each run to the harder target or the committed ``B0`` cell's cap.
4. **Figures.** Per arm and target: steps after warm-up and examples after warm-up
   (trained examples at the crossing minus the warm-up's ``10 B0``), geometric means with
   the study's 90 % seed-bootstrap intervals; the batch size at the crossing; the meter's
   cost (the examples its gradients read, ``m B`` per measurement, up to the crossing).
   Beside them the committed fixed-batch cells: the one with the fewest steps and the one
   with the fewest examples (``S B``, its interval scaled by ``B``).
5. **Verdicts** only where the 90 % intervals separate: the arm against each of those two
   fixed batch sizes, in steps and in examples.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from contrastive.configs import ConfigError
from experiments.common.cli import shared_module
from experiments.common.reports import loss_label
from experiments.study import protocol as P
from experiments.study.fitting import geometric_mean, interval, resampled_geomean
from experiments.study.harness import Study, StudyRun, time_line
from experiments.study.settings import StudySettings

__all__ = ["LOSSES", "FACTORS", "START_BATCH", "MAX_BATCH", "EVERY", "adaptive_runs",
           "run_adaptive", "summarise_adaptive", "adaptive_markdown"]  # fmt: skip

LOSSES = ("infonce",)
FACTORS = (1.0, 0.125)
START_BATCH, MAX_BATCH = 64, 4096
EVERY, NOISE_BATCHES = 10, 32


def _cell(committed: dict, loss: str, b: int, target: float) -> dict | None:
    for p in committed["summary"]:
        if (p["loss"], p["batch_size"], p["target"]) == (loss, b, target):
            return p
    return None


def adaptive_runs(s: StudySettings, committed: dict, losses: Sequence[str],
                  start: int, largest: int) -> list[StudyRun]:  # fmt: skip
    """The stage's runs, seeds outermost; building them checks every config."""
    harder = min(committed["targets"]["targets"])
    runs = []
    for seed in s.seeds:
        for loss in losses:
            p = _cell(committed, loss, start, harder)
            if p is None or p.get("learning_rate") is None:
                raise ConfigError(f"the committed study has no rate for {loss} at B = {start}")
            for factor in FACTORS:
                cfg = s.base(harder).with_updates(
                    loss=loss, batch_size=start, learning_rate=p["learning_rate"], seed=seed,
                    steps=p["cap"], checkpoint_every=p["cap"], adaptive_batch=True,
                    max_batch_size=largest, adaptive_factor=factor, adaptive_lr="sqrt",
                    noise_scale_every=EVERY, noise_batches=NOISE_BATCHES,
                )  # fmt: skip
                runs.append(StudyRun(f"adaptive-f{factor:g}", loss, start,
                                     p["learning_rate"], seed, cfg))  # fmt: skip
    return runs


def _crossing(row: dict, target: float, start: int) -> dict[str, Any] | None:
    """Steps and examples after warm-up at the first evaluation at or below ``target``."""
    step = row["steps_to"].get(str(target))
    if step is None:
        return None
    path = {s: (b, e) for s, b, e in row["batch_path"]}
    b, examples = path[step]
    meter = sum(m * bb for st, bb, m in row["meter"] if st <= step)
    return {"steps": max(1, step - P.WARMUP_STEPS),
            "examples": max(1, examples - P.WARMUP_STEPS * start),
            "batch_size": b, "meter_examples": meter}  # fmt: skip


def _stat(values: Sequence[float], rng: np.random.Generator) -> dict[str, Any]:
    draws = [resampled_geomean(values, rng) for _ in range(P.BOOTSTRAP_RESAMPLES)]
    return {"geomean": geometric_mean(values), "interval": interval(draws)}


def summarise_adaptive(rows: Sequence[dict], committed: dict, start: int) -> list[dict]:
    """Per (loss, factor, target): the arm's figures and the two fixed cells beside it."""
    rng = np.random.default_rng(0)
    out = []
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["factor"]), []).append(r)
    for (loss, factor), rs in groups.items():
        for t in committed["targets"]["targets"]:
            got = [_crossing(r, t, start) for r in sorted(rs, key=lambda r: r["seed"])]
            entry: dict[str, Any] = {
                "loss": loss,
                "factor": factor,
                "target": t,
                "seeds": sorted(r["seed"] for r in rs),
                "missed": sum(g is None for g in got),
                "per_seed": got,
            }
            done = [g for g in got if g is not None]
            if done and len(done) == len(got):
                entry["steps"] = _stat([g["steps"] for g in done], rng)
                entry["examples"] = _stat([g["examples"] for g in done], rng)
                entry["batch_at_target"] = [g["batch_size"] for g in done]
                entry["meter_examples"] = float(np.median([g["meter_examples"] for g in done]))
            fixed = [p for p in committed["summary"]
                     if p["loss"] == loss and p["target"] == t and p.get("geomean")]  # fmt: skip
            if fixed:
                fewest_steps = min(fixed, key=lambda p: p["geomean"])
                fewest_examples = min(fixed, key=lambda p: p["geomean"] * p["batch_size"])
                entry["fixed"] = {
                    "fewest_steps": _fixed(fewest_steps),
                    "fewest_examples": _fixed(fewest_examples),
                }
            entry["verdicts"] = _verdicts(entry)
            out.append(entry)
    return out


def _fixed(p: dict) -> dict[str, Any]:
    b = p["batch_size"]
    lo, hi = p["interval"]
    return {"batch_size": b, "steps": {"geomean": p["geomean"], "interval": [lo, hi]},
            "examples": {"geomean": p["geomean"] * b, "interval": [lo * b, hi * b]}}  # fmt: skip


def _verdicts(entry: dict) -> list[str]:
    out = []
    for name, f in (entry.get("fixed") or {}).items():
        for what in ("steps", "examples"):
            a, b = entry.get(what), f[what]
            if not a or a.get("interval") is None:
                continue
            (alo, ahi), (blo, bhi) = a["interval"], b["interval"]
            if ahi < blo:
                answer = "fewer"
            elif alo > bhi:
                answer = "more"
            else:
                answer = "not resolved"
            label = "fewest steps" if name == "fewest_steps" else "fewest examples"
            against = "against" if answer == "not resolved" else "than"
            out.append(f"{what} to {entry['target']:g}: {answer} {against} fixed B = "
                       f"{f['batch_size']} (the {label})")  # fmt: skip
    return out


def run_adaptive(s: StudySettings, committed: dict, record: dict[str, Any]) -> dict[str, Any]:
    """Train the stage's runs (or read them back) and summarise them into ``record``."""
    losses = LOSSES if s.preset != "custom" else s.run_losses
    start = START_BATCH if s.preset != "custom" else min(s.batch_sizes)
    largest = MAX_BATCH if s.preset != "custom" else max(s.batch_sizes)
    runs = adaptive_runs(s, committed, losses, start, largest)
    t0 = time.perf_counter()
    study = Study(s.out, P.METRIC, committed["targets"]["targets"])
    rows = []
    for run in runs:
        row = study.run(run, factor=run.config.run.adaptive_factor)
        rows.append(row)
    fixed = [{"loss": p["loss"], "target": p["target"], **_fixed(p)}
             for p in committed["summary"] if p["loss"] in losses and p.get("geomean")]  # fmt: skip
    record.update(losses=list(losses), start_batch=start, max_batch=largest, fixed_cells=fixed,
                  factors=list(FACTORS), every=EVERY, noise_batches=NOISE_BATCHES,
                  seeds=list(s.seeds), rows=rows,
                  summary=summarise_adaptive(rows, committed, start),
                  call_time_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    return record


def _cell_text(x: dict | None, fmt: str = "{:,.0f}") -> str:
    if not x:
        return "-"
    lo, hi = x["interval"]
    return f"{fmt.format(x['geomean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def adaptive_markdown(record: dict) -> str:
    """The stage's report."""
    lines = [
        "## An adaptive batch size against fixed ones",
        "",
        f"Rules: `experiments/study/adaptive_batch.py` (fixed before its runs). Start at B = "
        f"{record['start_batch']} at the committed rate, grow in powers of 2 up to "
        f"{record['max_batch']} while B_simple >= factor x B (measured every "
        f"{record['every']} steps from m = {record['noise_batches']} batches), the rate times "
        f"sqrt(B / B0); seeds {', '.join(map(str, record['seeds']))}; 90 % seed-bootstrap "
        "intervals; steps and examples after the warm-up.",
        "",
        "| loss | factor | target | steps [90 %] | examples [90 %] | B at the target | meter's "
        "examples (median) | fixed B, fewest steps | fixed B, fewest examples |",
        "|---|---:|---:|---|---|---|---:|---|---|",
    ]
    for e in record["summary"]:
        f = e.get("fixed") or {}
        fs, fe = f.get("fewest_steps"), f.get("fewest_examples")
        fixed_s = "-" if not fs else f"B = {fs['batch_size']}: {_cell_text(fs['steps'])} steps"
        fixed_e = ("-" if not fe else
                   f"B = {fe['batch_size']}: {_cell_text(fe['examples'])} examples")  # fmt: skip
        if e.get("steps") is None:
            steps = f"{e['missed']} of {len(e['seeds'])} seeds missed it"
            examples = path = meter = "-"
        else:
            steps, examples = _cell_text(e["steps"]), _cell_text(e["examples"])
            path = ", ".join(map(str, e["batch_at_target"]))
            meter = f"{e['meter_examples']:,.0f}"
        lines.append(f"| {loss_label(e['loss'])} | {e['factor']:g} | {e['target']:g} | {steps} | "
                     f"{examples} | {path} | {meter} | {fixed_s} | {fixed_e} |")  # fmt: skip
    lines += ["", "The committed fixed batch sizes (steps and examples after the warm-up, "
              "geometric means [90 %]):", "", "| loss | target | B | steps | examples |",
              "|---|---:|---:|---|---|"]  # fmt: skip
    for f in sorted(record.get("fixed_cells", []),
                    key=lambda f: (f["loss"], f["target"], f["batch_size"])):  # fmt: skip
        lines.append(f"| {loss_label(f['loss'])} | {f['target']:g} | {f['batch_size']} | "
                     f"{_cell_text(f['steps'])} | {_cell_text(f['examples'])} |")  # fmt: skip
    lines += ["", "Verdicts (only where 90 % intervals separate):", ""]
    for e in record["summary"]:
        for v in e["verdicts"]:
            lines.append(f"- {loss_label(e['loss'])}, factor {e['factor']:g}: {v}")
    lines.append("\n" + time_line(record["rows"], record.get("call_time_s", 0)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
