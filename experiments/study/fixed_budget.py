"""The batch-size study's fixed-budget stage: test accuracy after the same number of examples.

SimCLR (Chen et al. 2020, arXiv 2002.05709, Fig. 9) and SigLIP (Zhai et al. 2023, arXiv
2303.15343, Fig. 2) ask whether a larger batch is better when every batch size sees the
same number of training examples: with a budget of ``E`` examples, batch size ``B`` trains
``S_B = E / B`` optimiser steps. Here each (loss, B, seed) run trains ``S_B`` steps at the
learning rate the tuned study chose for (loss, B) (:func:`experiments.study.runs.chosen_rates`),
with the study's warm-up and constant rate, is evaluated on the validation split at the
study's geometric steps (so steps to each target come from the same runs), and its final
evaluation is on the test split: that is the number compared.

A stage shares :class:`Stage` (the base config, the run directory, the committed rates) with
its runs; :func:`train_runs` trains them in order and rewrites the stage's JSON after each,
so a stage cut short resumes (finished runs are read back, a run cut mid-way resumes from
its checkpoint). :func:`group_summary` reduces the rows per (stage, loss, B) to mean and
min–max over seeds; the arms stage (:mod:`experiments.study.arms`) uses the same pieces.

>>> budget_steps(512_000, [64, 256, 1024], min_steps=500)
{64: 8000, 256: 2000, 1024: 500}
>>> span({"mean": 0.281, "min": 0.27, "max": 0.29})
'28.1 (27.0–29.0)'
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError, differences
from experiments.common.cli import shared_module
from experiments.common.reports import loss_label, statistics, write_json
from experiments.study.runs import StudyRun, run_to_target

__all__ = [
    "DEFAULT_EXAMPLES",
    "DEFAULT_SIZES",
    "MIN_STEPS",
    "REPORTED",
    "Stage",
    "budget_steps",
    "check_rates_protocol",
    "budget_run",
    "budget_runs",
    "train_runs",
    "group_summary",
    "span",
    "run_fixed_budget",
    "budget_report",
]

DEFAULT_EXAMPLES = 512_000  # 500 steps of the largest default batch, 1024
DEFAULT_SIZES = (64, 256, 1024)
MIN_STEPS = 500  # the largest batch trains at least this many steps
CHECKPOINT_EVERY = 500  # a stage cut mid-run loses at most this many steps of that run
# The final evaluation's metrics in the tables (every metric is in the JSON rows).
REPORTED = ("zero_shot_top1", "zero_shot_top1_novel", "i2t_r@1", "t2i_r@1", "val_zero_shot_top1")
METRIC_TITLES = {
    "zero_shot_top1": "zero-shot top-1 on the test split (2,000 examples)",
    "zero_shot_top1_novel": "zero-shot top-1 on the test split's never-seen compositions",
    "i2t_r@1": "image-to-text recall@1 on the test split",
    "t2i_r@1": "text-to-image recall@1 on the test split",
    "val_zero_shot_top1": "zero-shot top-1 on the validation split (at the end)",
}
# What may differ between a run of a stage and the study whose rates it uses.
PER_RUN = ("--loss", "--batch-size", "--learning-rate", "--seed", "--steps", "--stop-at")


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage's runs share: the base config (the study's protocol), the run directory,
    the validation metric and its targets, the budget of examples, the committed rates."""

    base: Config
    out: Path
    metric: str
    targets: tuple[float, ...]
    examples: int
    rates: dict[tuple[str, int], dict[str, Any]]  # (loss, B) -> chosen_rates() entry
    rates_file: str
    losses: tuple[str, ...]
    seeds: tuple[int, ...]


def budget_steps(examples: int, sizes: Sequence[int], *, min_steps: int) -> dict[int, int]:
    """Steps of each batch size at a budget of ``examples``; ConfigError (one line) unless
    every batch size divides the budget and the largest trains at least ``min_steps``."""
    for b in sizes:
        if examples % b:
            lcm = math.lcm(*sizes)
            raise ConfigError(
                f"--budget-examples {examples} is not a multiple of the batch size {b}: use a "
                f"multiple of {lcm}, e.g. {max(lcm, examples - examples % lcm)}"
            )
    steps = {b: examples // b for b in sorted(sizes)}
    b = max(sizes)
    if steps[b] < min_steps:
        raise ConfigError(
            f"--budget-examples {examples} gives the largest batch ({b}) only {steps[b]} "
            f"steps, fewer than --min-steps {min_steps}: raise it to {min_steps * b} or more"
        )
    return steps


def check_rates_protocol(path: str, base: Config) -> None:
    """The study whose rates a stage uses ran under the stage's settings (every setting both
    record, except the per-run ones); ConfigError naming the differences if not."""
    try:
        theirs = json.loads(Path(path).read_text())["protocol"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--rates {path}: no protocol recorded ({type(e).__name__})") from None
    mine = base.identity()
    shared = [k for k in theirs if k in mine and k not in PER_RUN]
    changed = differences({k: theirs[k] for k in shared}, {k: mine[k] for k in shared})
    if changed:
        raise ConfigError(
            f"--rates {path} was tuned under other settings ({'; '.join(changed)}): give the "
            "stage that study's settings, or tune at these"
        )


def budget_run(stage: Stage, loss: str, batch_size: int, seed: int, *, name: str = "budget",
               **updates: Any) -> StudyRun:  # fmt: skip
    """The run of (loss, B, seed) at the committed rate for ``stage.examples // B`` steps,
    without a stop at a target; ``updates``: an arm's settings (``name`` its stage name)."""
    lr = stage.rates[(loss, batch_size)]["learning_rate"]
    steps = stage.examples // batch_size
    cfg = stage.base.with_updates(
        loss=loss, batch_size=batch_size, learning_rate=lr, seed=seed, steps=steps,
        checkpoint_every=min(steps, CHECKPOINT_EVERY), stop_at=None, **updates,
    )  # fmt: skip
    return StudyRun(name, loss, batch_size, lr, seed, cfg)


def budget_runs(stage: Stage, sizes: Sequence[int]) -> list[StudyRun]:
    """The fixed-budget stage's runs, seeds outermost (a stage cut short has whole seeds);
    building them checks every config (ConfigError, one line)."""
    return [
        budget_run(stage, loss, b, seed)
        for seed in stage.seeds
        for loss in stage.losses
        for b in sorted(sizes)
    ]


def train_runs(stage: Stage, runs: Sequence[StudyRun], path: Path, record: dict) -> list[dict]:
    """Train (or read back) ``runs`` in order; ``path`` (JSON) holds ``record`` and the rows
    so far after each run."""
    rows: list[dict] = []
    for i, run in enumerate(runs, 1):
        row = run_to_target(run, stage.out, stage.metric, stage.targets, f"{i}/{len(runs)}")
        row["steps"] = run.config.steps
        rows.append(row)
        write_json(path, {**record, "rows": rows})
    return rows


def group_summary(
    rows: Sequence[dict], metrics: Sequence[str], targets: Sequence[float]
) -> list[dict]:
    """Per (stage, loss, B): the seeds, the rate, the steps, each final metric's statistics
    over the seeds (mean, min, max; a failed run is None, said in ``failed``) and the steps
    to each target (``not_reached``: seeds that did not reach it within the budget)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["loss"], r["batch_size"]), []).append(r)
    out = []
    for (stage, loss, b), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        final = [{**r.get("final", {}), **r.get("measures", {})} for r in rs]
        entry: dict[str, Any] = {
            "stage": stage, "loss": loss, "batch_size": b,
            "learning_rate": rs[0]["learning_rate"], "steps": rs[0].get("steps"),
            "seeds": [r["seed"] for r in rs],
            "failed": [r["seed"] for r in rs if r.get("error")],
        }  # fmt: skip
        entry.update({m: statistics([f.get(m) for f in final]) for m in metrics})
        reached = {str(t): [r["steps_to"].get(str(t)) for r in rs] for t in targets}
        entry["steps_to"] = {t: statistics(v) for t, v in reached.items()}
        entry["not_reached"] = {t: sum(s is None for s in v) for t, v in reached.items()}
        out.append(entry)
    return out


def span(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean (min–max)"`` of a statistics entry (percent by default); ``-`` for None."""
    if stat is None:
        return "-"
    f = lambda v: f"{scale * v:.{digits}f}"
    return f"{f(stat['mean'])} ({f(stat['min'])}–{f(stat['max'])})"


def steps_cell(entry: dict, target: float) -> str:
    """Steps to ``target``: mean (min–max), and how many seeds missed it within the budget."""
    t = str(target)
    text = span(entry["steps_to"][t], scale=1.0, digits=0)
    missed = entry["not_reached"][t]
    if missed:
        text += f", {missed} of {len(entry['seeds'])} not in {entry['steps']}"
    return text


def protocol_lines(stage: Stage, steps: dict[int, int], runs: Sequence[StudyRun]) -> list[str]:
    """The stage's protocol, read from its runs' configs."""
    n = runs[0].config.data.train_examples
    lines = [
        f"- budget: {stage.examples:,} training examples = {stage.examples / n:.2f} epochs of "
        f"the {n:,}; steps " + ", ".join(f"{s} at B = {b}" for b, s in steps.items()),
        f"- learning rates: the chosen rates of `{stage.rates_file}` "
        "(for its highest target that one of its rates reached):",
    ]
    for (loss, b), r in sorted(stage.rates.items()):
        lines.append(f"  - {loss_label(loss)}, B = {b}: {r['learning_rate']:.3g} "
                     f"(chosen for {r['target']:g})")  # fmt: skip
    c = runs[0].config
    lines.append(
        f"- schedule: {c.train.optim.warmup_steps} warm-up steps, then constant "
        f"(end ratio {c.train.optim.end_lr_ratio:g}); validation `{stage.metric}` at the steps "
        f"ceil({c.run.eval_growth:g}^k); the final evaluation (the last step) on the test split"
    )
    lines.append(f"- seeds {list(stage.seeds)}; every cell mean (min–max) over the seeds")
    fixed = {k: v for k, v in c.identity().items() if k not in PER_RUN}
    lines.append("- the same in every run: " + ", ".join(f"`{k} {v}`" for k, v in fixed.items()))
    return lines


def run_fixed_budget(
    stage: Stage, sizes: Sequence[int], min_steps: int, record: dict, path: Path
) -> dict:
    """The fixed-budget stage: its runs (:func:`budget_runs`) trained in order, the rows in
    ``record`` with their summary; ``path`` (JSON) holds the record so far after each run."""
    steps = budget_steps(stage.examples, sizes, min_steps=min_steps)
    runs = budget_runs(stage, sizes)
    protocol = protocol_lines(stage, steps, runs)
    print("\n".join(protocol), file=sys.stderr, flush=True)
    record.update(budget_examples=stage.examples, steps=steps, protocol=runs[0].config.identity(),
                  protocol_lines=protocol)  # fmt: skip
    record["rates"] = [{"loss": lo, "batch_size": b, **r} for (lo, b), r in stage.rates.items()]
    rows = train_runs(stage, runs, path, record)
    record.update(rows=rows, summary=group_summary(rows, REPORTED, stage.targets))
    return record


def budget_report(record: dict) -> str:
    """The fixed-budget stage's Markdown: protocol, one table per test metric, steps to each
    target from the same runs, and per loss which batch size ends best."""
    summary, losses = record["summary"], record["losses"]
    lines = [f"## Test accuracy at a fixed budget of {record['budget_examples']:,} examples "
             "(shapes, locked image tower)", "", *record["protocol_lines"]]  # fmt: skip
    cell = {(p["loss"], p["batch_size"]): p for p in summary if p["stage"] == "budget"}
    sizes = sorted({b for _, b in cell})
    steps = {b: p["steps"] for (_, b), p in cell.items()}
    head = "| batch | steps | " + " | ".join(loss_label(x) for x in losses) + " |"
    rule = "|---:|---:|" + "---:|" * len(losses)
    for m in REPORTED:
        lines += ["", f"Final {METRIC_TITLES[m]}, % (mean (min–max)):", "", head, rule]
        for b in sizes:
            vals = [span(cell[(lo, b)][m]) if (lo, b) in cell else "-" for lo in losses]
            lines.append(f"| {b} | {steps[b]} | " + " | ".join(vals) + " |")
    for t in record["targets"]:
        lines += ["", f"Steps to {record['metric']} >= {t:g} in the same runs:", "", head, rule]
        for b in sizes:
            vals = [steps_cell(cell[(lo, b)], t) if (lo, b) in cell else "-" for lo in losses]
            lines.append(f"| {b} | {steps[b]} | " + " | ".join(vals) + " |")
    lines += ["", "Is a larger batch better at this budget (final test zero-shot top-1)?", ""]
    lines += [f"- {verdict(summary, loss, sizes)}" for loss in losses]
    lines.append(f"\nTotal time {record.get('total_time_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def verdict(summary: Sequence[dict], loss: str, sizes: Sequence[int]) -> str:
    """The batch sizes of ``loss`` ordered by seed-mean test top-1, and which of the others
    the best one's min–max range clears (lies wholly above) or overlaps."""
    pts = {p["batch_size"]: p["zero_shot_top1"] for p in summary
           if p["stage"] == "budget" and p["loss"] == loss and p["zero_shot_top1"]}  # fmt: skip
    if len(pts) < 2:
        return f"{loss_label(loss)}: fewer than two batch sizes finished"
    order = sorted(pts, key=lambda b: -pts[b]["mean"])
    best = order[0]
    clear = [b for b in order[1:] if pts[best]["min"] > pts[b]["max"]]
    overlap = [b for b in order[1:] if b not in clear]
    ranking = " > ".join(f"B = {b} ({100 * pts[b]['mean']:.1f})" for b in order)
    parts = []
    if clear:
        parts.append(f"clear of B = {', '.join(map(str, clear))}")
    if overlap:
        parts.append(f"overlapping B = {', '.join(map(str, overlap))}")
    return f"{loss_label(loss)}: {ranking}; the best's min–max range {' and '.join(parts)}"


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
