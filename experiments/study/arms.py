"""The batch-size study's arms: hard batches and a negative queue against random batches.

Two ways to give a batch of ``B`` pairs more (or harder) negatives without a larger batch:

- **queue** (MoCo's queue, He et al. 2020, arXiv 1911.05722, without its momentum encoder):
  the second tower's embeddings of the last ``K`` steps join the loss as extra negatives (no
  gradient flows into them), ``K = Q / B - 1`` so that every anchor meets ``B (1 + K) = Q``
  candidates, as many as in a random batch of ``Q`` (``--queue-negatives``, 1024 by default:
  ``K = 15`` at ``B = 64``, ``K = 3`` at ``B = 256``);
- **hard** batches (NGAME, Dahiya et al. 2023; TAS-Balanced, Hofstätter et al. 2021): every
  ``R`` steps the training set is clustered by the model's image embeddings into groups of
  ``c`` and each batch is ``B / c`` whole groups, so that batch-mates are neighbours.

Why the hard arm's settings (fixed before its first run). Clusters of 16: 16 divides both
arm batch sizes and the training set, so every batch is 4 (B = 64) or 16 whole clusters,
never one neighbourhood; and it is about one composition's share of the data (65,536 /
5,184 = 12.6 images per caption), so a cluster is a composition with its nearest
neighbours, one attribute away: the hard negatives, beside duplicate captions that would be
false negatives, hence ``--skip-duplicate-negatives`` in this arm (the hard-batch inputs
give the loss the caption ids on ``shapes`` in any case; random batches of 64 or 256 hold
about 0.4 and 6 same-caption pairs: the random arm, the committed protocol, keeps them). A
refresh once an epoch: training takes a new clustering into use only at the start of an
epoch (:mod:`contrastive.inputs.hard_batch_inputs`), so refreshing more often changes nothing, and
the first epoch is random batches whatever the setting: 1,024 steps at B = 64, 256 at
B = 256. Inside the first epoch the arm differs from the random arm only by another random
order and by its duplicate captions not being negatives: in the committed study B = 256
reaches 0.30 in about 210 steps, so at B = 256 the arm is judged on its final test metrics
after 7.8 epochs (6.8 of them hard); at B = 64 the 0.30 target (about 900 to 2,200 steps)
falls around the first clustering.

Each arm runs the fixed budget of :mod:`experiments.study.fixed_budget` at the random arm's rate
for (loss, B) (the committed study's), and is compared with the random batches of the same
(loss, B, rate, seed), which are that stage's runs (in the same run directory they are read
back, not trained again): steps to each validation target from the curve, and the final test
metrics. The random arm also runs at the other batch sizes of the fixed-budget stage, and
:func:`matched_batch` reads off the random batch size that needs as many steps to a target as
the arm did: the interpolation of the seed means on the random arm's log-log curve.

>>> round(matched_batch([64, 256, 1024], [800, 200, 50], 100))
512
>>> matched_batch([64, 256], [800, 200], 1000)
{'batch': None, 'bound': '<', 'of': 64}
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import ConfigError
from contrastive.step.negative_queue import check_queue_length
from experiments.common.cli import shared_module
from experiments.common.reports import loss_label
from experiments.study.fixed_budget import (
    REPORTED,
    Stage,
    budget_run,
    budget_steps,
    group_summary,
    protocol_lines,
    span,
    steps_cell,
    train_runs,
)
from experiments.study.runs import StudyRun

__all__ = [
    "ARM_NAMES",
    "DEFAULT_ARM_SIZES",
    "ArmSettings",
    "arm_updates",
    "check_arm_names",
    "check_arms",
    "arm_runs",
    "matched_batch",
    "run_arms",
    "arms_report",
]

ARM_NAMES = ("hard", "queue")
# Besides accuracy, per run (:func:`experiments.study.runs.run_to_target`): batch-mates one
# attribute away per anchor over the last epoch, and the re-clustering's share of the time.
ARM_MEASURES = ("hard_negatives", "refresh_share")
DEFAULT_ARM_SIZES = (64, 256)


@dataclasses.dataclass(frozen=True)
class ArmSettings:
    """The arms' settings, fixed before any run (see the study's module docstring)."""

    queue_negatives: int = 1024  # B (1 + K): the candidates per anchor of the queue arm
    cluster_size: int = 16
    refresh_epochs: float = 1.0  # hard batches: re-cluster every this many epochs
    train_examples: int = 65536


def arm_updates(arm: str, batch_size: int, s: ArmSettings) -> tuple[str, dict[str, Any]]:
    """``(stage name, config updates)`` of ``arm`` at ``batch_size``.

    >>> arm_updates("queue", 64, ArmSettings())
    ('queue-k15', {'negative_queue': 15})
    >>> arm_updates("hard", 256, ArmSettings())[0]
    'hard-c16-r256'
    """
    if arm == "queue":
        k = s.queue_negatives // batch_size - 1
        return f"queue-k{k}", {"negative_queue": k}
    if arm == "hard":
        r = max(1, round(s.refresh_epochs * s.train_examples / batch_size))
        # Same-caption batch-mates are not negatives: a cluster of 16 is mostly one
        # composition's images (about 12.6 per composition), whose captions are identical.
        updates = {"hard_batches": True, "cluster_size": s.cluster_size, "refresh_every": r,
                   "skip_duplicate_negatives": True}  # fmt: skip
        return f"hard-c{s.cluster_size}-r{r}", updates
    raise ConfigError(f"unknown arm {arm!r} in --arms: use {', '.join(ARM_NAMES)}")


def check_arm_names(arms: Sequence[str]) -> None:
    """``--arms`` names known arms (ConfigError, one line): checked whatever the stage, so
    that a typo never goes unnoticed."""
    if not arms:
        raise ConfigError(f"--arms: give at least one of {', '.join(ARM_NAMES)}")
    for arm in arms:
        if arm not in ARM_NAMES:
            raise ConfigError(f"unknown arm {arm!r} in --arms: use {', '.join(ARM_NAMES)}")


def check_arms(arms: Sequence[str], sizes: Sequence[int], s: ArmSettings) -> None:
    """Every arm can run at every batch size; ConfigError (one line) before any run if not."""
    check_arm_names(arms)
    if not (s.refresh_epochs > 0 and math.isfinite(s.refresh_epochs)):
        raise ConfigError(f"--refresh-epochs must be positive, got {s.refresh_epochs}")
    for b in sizes:
        q = s.queue_negatives
        if "queue" in arms and (q % b or q <= b):
            raise ConfigError(
                f"--queue-negatives {q} must be a multiple of every arm batch size and larger "
                f"than it (B (1 + K) = {q}); {b} is not: change one of them"
            )
        if "queue" in arms:
            try:
                check_queue_length(q // b - 1, b, s.train_examples)
            except ValueError as e:
                raise ConfigError(f"--queue-negatives {q} at B = {b}: {e}") from None
        if "hard" in arms and b % s.cluster_size:
            raise ConfigError(
                f"--cluster-size {s.cluster_size} must divide every arm batch size; {b} is not "
                "a multiple of it"
            )
    if "hard" in arms:  # what training would refuse mid-stage, refused before any run
        from contrastive.inputs.hard_batch_inputs import check_hard_batches

        for b in sizes:
            check_hard_batches(num_examples=s.train_examples, batch_size=b,
                               cluster_size=s.cluster_size, cluster_tower="image",
                               kind="image_text")  # fmt: skip


def matched_batch(
    sizes: Sequence[int], steps: Sequence[float], target_steps: float
) -> float | dict[str, Any]:
    """The random batch size that needs ``target_steps`` steps: log-log interpolation.

    ``sizes``, ``steps``: the random arm's batch sizes and seed-mean steps to a target (two
    or more). ``log B`` is interpolated linearly in ``log S`` on the first segment (in
    increasing ``B``) that brackets ``log target_steps``. Outside the measured range no
    extrapolation: ``{"batch": None, "bound": "<", "of": smallest B}`` when the steps exceed
    every random batch's (slower than the smallest batch), ``">"`` and the largest when they
    are below every one.
    """
    pts = sorted(zip(sizes, steps, strict=True))
    if len(pts) < 2 or any(b <= 0 or s <= 0 for b, s in pts) or not target_steps > 0:
        raise ValueError("matched_batch needs two or more positive (batch, steps) points")
    lb = [math.log(b) for b, _ in pts]
    ls = [math.log(s) for _, s in pts]
    x = math.log(target_steps)
    if x > max(ls):
        return {"batch": None, "bound": "<", "of": pts[0][0]}
    if x < min(ls):
        return {"batch": None, "bound": ">", "of": pts[-1][0]}
    for i in range(len(pts) - 1):
        lo, hi = ls[i], ls[i + 1]
        if min(lo, hi) <= x <= max(lo, hi):
            if lo == hi:
                return float(pts[i][0])
            return math.exp(lb[i] + (x - lo) / (hi - lo) * (lb[i + 1] - lb[i]))
    raise AssertionError("unreachable: x lies within [min, max] of a continuous curve")


def _matches(summary: Sequence[dict], targets: Sequence[float]) -> list[dict]:
    """Per arm entry and target: the matched random batch size; None unless every seed of
    the arm reached the target and two or more random batch sizes did in every seed."""
    out = []
    for p in summary:
        if p["stage"] == "budget":
            continue
        for t in map(str, targets):
            curve = sorted(
                (q["batch_size"], q["steps_to"][t]["mean"])
                for q in summary
                if q["stage"] == "budget" and q["loss"] == p["loss"] and q["steps_to"][t]
                and not q["not_reached"][t]
            )  # fmt: skip
            st = p["steps_to"][t]
            ok = st is not None and not p["not_reached"][t] and len(curve) >= 2
            match = matched_batch(*zip(*curve, strict=True), st["mean"]) if ok else None
            out.append({"stage": p["stage"], "loss": p["loss"], "batch_size": p["batch_size"],
                        "target": float(t), "matched_batch": match})  # fmt: skip
    return out


def arm_runs(
    stage: Stage,
    arm_sizes: Sequence[int],
    curve_sizes: Sequence[int],
    arms: Sequence[str],
    settings: ArmSettings,
) -> list[StudyRun]:
    """Per seed and loss: the random runs at every batch size (the curve), then each arm at
    each of ``arm_sizes``; building them checks every config (ConfigError, one line)."""
    runs = []
    for seed in stage.seeds:
        for loss in stage.losses:
            runs += [
                budget_run(stage, loss, b, seed) for b in sorted(set(curve_sizes) | set(arm_sizes))
            ]
            for b in sorted(arm_sizes):
                for arm in arms:
                    name, updates = arm_updates(arm, b, settings)
                    runs.append(budget_run(stage, loss, b, seed, name=name, **updates))
    return runs


def run_arms(
    stage: Stage,
    arm_sizes: Sequence[int],
    curve_sizes: Sequence[int],
    arms: Sequence[str],
    settings: ArmSettings,
    min_steps: int,
    record: dict,
    path: Path,
) -> dict:
    """The arms stage: its runs (:func:`arm_runs`) trained in order, the rows in ``record``
    with their summary and the matched random batch sizes; ``path`` (JSON) holds the record
    so far after each run."""
    random_sizes = sorted(set(curve_sizes) | set(arm_sizes))
    steps = budget_steps(stage.examples, random_sizes, min_steps=min_steps)
    runs = arm_runs(stage, arm_sizes, curve_sizes, arms, settings)
    protocol = protocol_lines(stage, steps, runs)
    protocol.insert(0, f"- random: batches drawn at random (the fixed-budget stage's runs) at "
                    f"B = {', '.join(map(str, random_sizes))}: the comparison at the same "
                    "(B, rate, seed), and the curve the matched batch sizes come from")  # fmt: skip
    for b in sorted(arm_sizes):
        for arm in arms:
            name, updates = arm_updates(arm, b, settings)
            what = ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in updates.items())
            protocol.insert(1, f"- {arm} at B = {b} (`{name}`): {what}")
    print("\n".join(protocol), file=sys.stderr, flush=True)
    record.update(budget_examples=stage.examples, steps=steps, arms=list(arms),
                  arm_batch_sizes=sorted(arm_sizes), random_batch_sizes=random_sizes,
                  arm_settings=dataclasses.asdict(settings), protocol_lines=protocol,
                  protocol=runs[0].config.identity())  # fmt: skip
    record["rates"] = [{"loss": lo, "batch_size": b, **r} for (lo, b), r in stage.rates.items()]
    rows = train_runs(stage, runs, path, record)
    summary = group_summary(rows, (*REPORTED, *ARM_MEASURES), stage.targets)
    record.update(rows=rows, summary=summary, matches=_matches(summary, stage.targets))
    return record


def _match_text(m: float | dict | None) -> str:
    if m is None:
        return ""
    if isinstance(m, dict):
        return f" [random B {m['bound']} {m['of']}]"
    return f" [random B ≈ {m:.0f}]"


def arms_report(record: dict) -> str:
    """The arms stage's Markdown: protocol, steps to each target (with the matched random
    batch size), and the final test metrics, rows (B, arm), one column per loss."""
    summary, losses = record["summary"], record["losses"]
    lines = ["## Hard batches and a negative queue against random batches (shapes, locked "
             "image tower)", "", *record["protocol_lines"]]  # fmt: skip
    cell = {(p["stage"], p["loss"], p["batch_size"]): p for p in summary}
    match = {(m["stage"], m["loss"], m["batch_size"], m["target"]): m["matched_batch"]
             for m in record["matches"]}  # fmt: skip
    arm_rows = [("budget", b) for b in record["random_batch_sizes"]]
    arm_rows += sorted({(p["stage"], p["batch_size"]) for p in summary if p["stage"] != "budget"},
                       key=lambda r: (r[1], r[0]))  # fmt: skip
    arm_rows.sort(key=lambda r: (r[1], r[0] != "budget"))
    head = "| batch | arm | " + " | ".join(loss_label(x) for x in losses) + " |"
    rule = "|---:|---|" + "---:|" * len(losses)

    def label(stage: str) -> str:
        return "random" if stage == "budget" else stage

    for t in record["targets"]:
        lines += ["", f"Steps to {record['metric']} >= {t:g} (mean (min–max); [the random "
                  "batch size with as many steps]):", "", head, rule]  # fmt: skip
        for stage, b in arm_rows:
            vals = []
            for lo in losses:
                p = cell.get((stage, lo, b))
                text = "-" if p is None else steps_cell(p, t)
                vals.append(text + _match_text(match.get((stage, lo, b, float(t)))))
            lines.append(f"| {b} | {label(stage)} | " + " | ".join(vals) + " |")
    for m in ("zero_shot_top1", "zero_shot_top1_novel"):
        lines += ["", f"Final `{m}` on the test split after the budget, % (mean (min–max)):",
                  "", head, rule]  # fmt: skip
        for stage, b in arm_rows:
            vals = [span(cell[(stage, lo, b)][m]) if (stage, lo, b) in cell else "-"
                    for lo in losses]  # fmt: skip
            lines.append(f"| {b} | {label(stage)} | " + " | ".join(vals) + " |")
    measures = [("hard_negatives", "Hard negatives per anchor (batch-mates one attribute away), "
                 "mean over the logged steps of the last epoch (mean (min–max)):", 1.0, 2),
                ("refresh_share", "Re-clustering time as a share of the run's wall time "
                 "(evaluations included), % (mean (min–max)):", 100.0, 1)]  # fmt: skip
    for m, title, scale, digits in measures:
        kept = [(st, b) for st, b in arm_rows
                if any(cell.get((st, lo, b), {}).get(m) for lo in losses)]  # fmt: skip
        if not kept:
            continue
        lines += ["", title, "", head, rule]
        for stage, b in kept:
            vals = [span(cell.get((stage, lo, b), {}).get(m), scale, digits) for lo in losses]
            lines.append(f"| {b} | {label(stage)} | " + " | ".join(vals) + " |")
    lines.append(f"\nTotal time {record.get('total_time_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
