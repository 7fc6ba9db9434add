"""One run of a study to its target, and the rates file of protocol version 1.

A study run is one :class:`~contrastive.configs.Config` trained by
:func:`contrastive.run.loop.train` until its validation metric first reaches the target it stops
at (``--stop-at``) or its step cap; the loop evaluates on a geometric schedule
(``--eval-growth``), so the first step at which each target is reached is known to a few
per cent. Every run keeps its own work dir inside the study's run directory; a finished one
is read back, not trained again, so a study cut short resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError
from contrastive.data.pipeline import get_spec, lower_is_better, metric_names
from contrastive.run.loop import RunError, train
from experiments.common.cli import shared_module

__all__ = ["StudyRun", "StudyStopped", "run_to_target", "chosen_rates", "first_crossing"]


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of the study: its coordinates and the config it trains."""

    stage: str  # "tune", "seeds", "budget" or an arm's ("queue-k15", "hard-c16-r256")
    loss: str
    batch_size: int
    learning_rate: float
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return (
            f"{self.stage}_{self.loss}_b{self.batch_size}_lr{self.learning_rate:.3g}_s{self.seed}"
        )


def first_crossing(
    steps: Sequence[int], values: Sequence[float], target: float, *, lower: bool = False
) -> int | None:
    """The first evaluated step at which ``values`` reach ``target`` (None: never): rise to it,
    or with ``lower`` (a loss) fall to it.

    >>> first_crossing([10, 20, 40], [0.1, 0.5, 0.9], 0.5)
    20
    >>> first_crossing([10, 20, 40], [5.0, 4.2, 3.9], 4.0, lower=True)
    40
    """
    for s, v in zip(steps, values, strict=True):
        if v is not None and (v <= target if lower else v >= target):
            return int(s)
    return None


class StudyStopped(Exception):
    """A run of the study was stopped by a signal before its last step (it saved a
    checkpoint): the study stops too, and the same command resumes it."""


def run_to_target(
    run: StudyRun, root: Path, metric: str, targets: Sequence[float], index: str
) -> dict[str, Any]:
    """Train (or read back) ``run`` in ``root/runs/<name>``; its row: steps to each target
    (None: not reached within the cap), the final metrics (every metric of the last
    evaluation, test and validation, also under ``final``), the validation curve, the noise
    scale measurements, the batches' hard negatives and re-clustering share (``measures``),
    the wall time."""
    cfg = run.config.with_updates(workdir=str(root / "runs" / run.name))
    t0 = time.perf_counter()
    print(f"[{index}] {run.name}: cap {cfg.steps} steps", file=sys.stderr, flush=True)
    row: dict[str, Any] = {
        "stage": run.stage,
        "loss": run.loss,
        "batch_size": run.batch_size,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "cap": cfg.steps,
    }
    try:
        records = train(cfg)
    except RunError as e:  # diverged: no target reached, said so
        row.update(error=str(e), steps_to={str(t): None for t in targets}, curve=[])
        print(f"[{index}] {run.name}: failed: {e}", file=sys.stderr)
        return row
    last = records[-1] if records else {}
    if last.get("step", 0) < cfg.steps and "reached_target" not in last:
        raise StudyStopped(
            f"[{index}] {run.name} stopped before its last step ({cfg.steps}) by SIGTERM or "
            "SIGINT, its checkpoint saved: run the same command with the same --out to resume"
        )
    evals = [r for r in records if metric in r]
    steps, values = [r["step"] for r in evals], [r[metric] for r in evals]
    row["curve"] = [[s, v] for s, v in zip(steps, values, strict=True)]
    lower = lower_is_better(metric)
    row["steps_to"] = {str(t): first_crossing(steps, values, t, lower=lower) for t in targets}
    # Every zero-shot validation curve the run logged (the study's second column reads one).
    row["curves"] = {
        name: [[r["step"], r[name]] for r in records if name in r]
        for name in ("val_zero_shot_xent", "val_zero_shot_top1")
        if any(name in r for r in records)
    }
    final = records[-1] if records else {}
    row["final_step"] = final.get("step")
    row.update({k: final[k] for k in ("zero_shot_top1", "zero_shot_top1_novel") if k in final})
    spec = get_spec(cfg.data.dataset, cfg.data.image_size)
    names = metric_names(spec, validation=bool(cfg.data.validation_examples))
    row["final"] = {k: final[k] for k in names if k in final}
    row["measures"] = _negatives_and_refresh(records, cfg)
    row["noise_b_simple"] = [
        [r["step"], r["noise_b_simple"]] for r in records if "noise_b_simple" in r
    ]
    # The meter's parts, so that seeds and checkpoints are pooled before dividing.
    row["noise"] = [
        {"step": r["step"], "trace": r["noise_trace"], "g2": r["noise_g2"],
         "variance_se": r["noise_variance_se"], "b_simple": r["noise_b_simple"]}
        for r in records if "noise_trace" in r
    ]  # fmt: skip
    if getattr(cfg.run, "adaptive_batch", False):  # the batch path, and what the meter read
        row["batch_path"] = [
            [r["step"], r["batch_size"], r["examples"]] for r in records if "examples" in r
        ]
        row["meter"] = [
            [r["step"], r["batch_size"], cfg.run.noise_batches] for r in records
            if "noise_trace" in r
        ]  # fmt: skip
    row["time_s"] = round(time.perf_counter() - t0, 1)  # reading a finished run back: seconds
    # The run's own training time from its log (the same whether trained now or read back).
    row["train_s"] = final.get("elapsed_s")
    reached = ", ".join(f"{t}: {s}" for t, s in row["steps_to"].items())
    print(f"[{index}] {run.name}: steps to target {{{reached}}} ({row['time_s']} s)",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def _negatives_and_refresh(records: Sequence[dict], cfg: Config) -> dict[str, float]:
    """What the arms of the study compare besides accuracy: ``hard_negatives`` (batch-mates
    one attribute away per anchor, logged on ``shapes``) averaged over the logged steps of
    the run's last epoch, where the hard arm's batches are clustered (its first epoch is
    random); and ``refresh_share``, the hard batches' re-clustering time as a share of the
    run's wall time (evaluations included) at its last logged step."""
    out: dict[str, float] = {}
    logged = [r for r in records if "hard_negatives" in r]
    if logged:
        n = cfg.data.train_examples
        epoch = max(1, n // cfg.run.batch_size) if n else len(records)
        last = [r["hard_negatives"] for r in logged if r["step"] > logged[-1]["step"] - epoch]
        out["hard_negatives"] = sum(last) / len(last)
    timed = [r for r in records if "refresh_total_s" in r and r.get("elapsed_s")]
    if timed:
        out["refresh_share"] = timed[-1]["refresh_total_s"] / timed[-1]["elapsed_s"]
    return out


def chosen_rates(
    path: str | Path,
    losses: Sequence[str],
    sizes: Sequence[int],
    targets: Sequence[float] | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(loss, B): {"learning_rate", "target", "cap"}}`` from a finished study's JSON: the
    rate chosen for the highest of ``targets`` (default: the study's own) that one of its
    rates reached, that target, and the batch size's step cap. ConfigError (one line) if the
    file is not a finished study or lacks a (loss, B)."""
    need = {"loss", "batch_size", "target", "learning_rate"}
    try:
        study = json.loads(Path(path).read_text())
        summary, rows = study["summary"], study["rows"]
        targets = study["targets"] if targets is None else targets
        if not all(isinstance(p, dict) and need <= set(p) for p in summary):
            raise KeyError("a summary entry without a chosen rate")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--rates {path}: not a finished tuned study of protocol version 1 "
            f"({type(e).__name__}): give experiments/results/v1/batch_size_study.json or "
            "another version-1 --tune study's JSON"
        ) from None
    out = {}
    for loss in losses:
        for b in sizes:
            points = [p for p in summary if (p["loss"], p["batch_size"]) == (loss, b)]
            chosen = [
                p
                for p in sorted(points, key=lambda p: -p["target"])
                if p["learning_rate"] and p["target"] in targets
            ]
            caps = [r["cap"] for r in rows if (r["loss"], r["batch_size"]) == (loss, b)]
            if not chosen or not caps:
                raise ConfigError(
                    f"--rates {path} has no chosen rate for {loss} at B = {b}: run with --tune"
                )
            out[(loss, b)] = {
                "learning_rate": chosen[0]["learning_rate"],
                "target": chosen[0]["target"],
                "cap": max(caps),
            }
    return out


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
