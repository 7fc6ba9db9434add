"""The batch-size study's stages: ``--stage fixed-budget``, ``arms`` and ``rate-edges``.

:func:`run_stage` checks everything a stage needs before its run directory exists (batch
sizes against the budget and the training set, the arms' settings, the rates file and the
settings it was tuned under, every run's config), then trains the stage's runs
(:mod:`experiments.common.budget`, :mod:`experiments.common.arms`) under the persistent
compilation cache, and writes ``<stem>_<stage>.{json,md,png}`` into the run directory. The
protocol is the study command's module docstring. ``rate-edges`` checks a tuned study's own
choices instead (:mod:`experiments.common.rate_edges`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError
from contrastive.loss_registry import LOSS_NAMES
from experiments.common import run_dir
from experiments.common.arms import (
    ARM_NAMES,
    DEFAULT_ARM_SIZES,
    ArmSettings,
    arm_runs,
    arms_report,
    check_arms,
    run_arms,
)
from experiments.common.budget import (
    DEFAULT_EXAMPLES,
    DEFAULT_SIZES,
    MIN_STEPS,
    Stage,
    budget_report,
    budget_runs,
    budget_steps,
    check_rates_protocol,
    run_fixed_budget,
)
from experiments.common.cli import shared_module
from experiments.common.grid import compile_cache
from experiments.common.rate_edges import run_rate_edges
from experiments.common.reports import write_json
from experiments.common.stage_plots import plot_arms, plot_budget
from experiments.common.study import chosen_rates

__all__ = [
    "STAGES",
    "ARM_NAMES",
    "DEFAULT_ARM_SIZES",
    "DEFAULT_EXAMPLES",
    "DEFAULT_SIZES",
    "MIN_STEPS",
    "run_stage",
]

STAGES = ("fixed-budget", "arms", "rate-edges")


def run_stage(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    base_config: Callable[[argparse.Namespace, int, Path], Config],
    n_train: int,
    stem: str,
) -> dict:
    """Run ``args.stage`` of the study command: ``args`` its parsed flags (``targets``
    already a list), ``base_config(args, n_train, out)`` the settings every run shares,
    ``n_train`` the training examples, ``stem`` the output files' prefix. Returns the
    stage's record (what its JSON holds)."""
    if args.stage == "rate-edges":  # its own settings: experiments/common/rate_edges.py
        return run_rate_edges(args, argv, base_config)
    for loss in args.losses:
        if loss not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {loss!r} in --losses: use {', '.join(LOSS_NAMES)}")
    sizes = sorted(args.batch_sizes or DEFAULT_SIZES)
    arm_sizes = sorted(args.arm_batch_sizes)
    every = sorted(set(sizes) | (set(arm_sizes) if args.stage == "arms" else set()))
    if min(every) < 1:
        raise ConfigError(f"batch sizes must be positive, got {min(every)}: drop it")
    if max(every) > n_train:
        raise ConfigError(
            f"batch sizes up to {max(every)} exceed the {n_train} training examples: lower "
            "them or raise --train-examples"
        )
    budget_steps(args.budget_examples, every, min_steps=args.min_steps)
    settings = ArmSettings(args.queue_negatives, args.cluster_size, args.refresh_epochs, n_train)
    if args.stage == "arms":
        check_arms(args.arms, arm_sizes, settings)
    try:
        base = base_config(args, n_train, Path(args.out or "."))
    except ConfigError as e:
        raise ConfigError(str(e).replace("--stop-at", "--metric")) from None
    check_rates_protocol(args.rates, base)
    rates = chosen_rates(args.rates, args.losses, every)

    def stage_at(out: Path) -> Stage:
        return Stage(base_config(args, n_train, out), out, args.metric, tuple(args.targets),
                     args.budget_examples, rates, args.rates, tuple(args.losses),
                     tuple(args.seeds))  # fmt: skip

    trial = stage_at(Path(args.out or "."))  # every run's config checked before any exists
    if args.stage == "fixed-budget":
        budget_runs(trial, sizes)
    else:
        arm_runs(trial, arm_sizes, sizes, args.arms, settings)
    name = f"{stem}_{args.stage.replace('-', '_')}"
    out = run_dir.create(name, args.out)
    print(f"run directory: {out}", file=sys.stderr, flush=True)
    stage = stage_at(out)
    record: dict[str, Any] = {
        "command": " ".join(["python -m experiments.batch_size_study", *(argv or sys.argv[1:])]),
        "stage": args.stage, "metric": args.metric, "targets": args.targets,
        "losses": args.losses, "seeds": args.seeds, "rates_file": args.rates,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }  # fmt: skip
    t_start = time.perf_counter()
    with compile_cache(args.compile_cache or out / "compile_cache"):
        if args.stage == "fixed-budget":
            run_fixed_budget(stage, sizes, args.min_steps, record, out / f"{name}.json")
        else:
            run_arms(stage, arm_sizes, sizes, args.arms, settings, args.min_steps, record,
                     out / f"{name}.json")  # fmt: skip
    record["total_time_s"] = round(time.perf_counter() - t_start, 1)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out / f"{name}.json", record)
    fixed = args.stage == "fixed-budget"
    text = budget_report(record) if fixed else arms_report(record)
    (out / f"{name}.md").write_text(text)
    (plot_budget if fixed else plot_arms)(record, out / f"{name}.png")
    if args.update_results:
        run_dir.publish(out, [f"{name}.{ext}" for ext in ("json", "md", "png")])
    print(text)
    print(f"plot: {out / f'{name}.png'}")
    print(f"run directory: {out}")
    return record


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
