"""The study's stages at protocol version 1's rates: ``--stage fixed-budget`` and ``arms``.

Both ran on the learning rates that version 1 of the batch-size study chose (top-1 targets
0.25 and 0.30, committed in ``experiments/results/v1/``), never tuning. They have their own
flags (:func:`build_parser`); :func:`run_stage` checks everything a stage needs before its
run directory exists (batch sizes against the budget and the training set, the arms'
settings, the rates file and the settings it was tuned under, every run's config), then
trains the stage's runs (:mod:`experiments.study.fixed_budget`,
:mod:`experiments.study.arms`) under the persistent compilation cache, and writes
``batch_size_study_<stage>.{json,md,png}`` into the run directory.

Protocol of both (fixed before their first run): a model and data as the study's
(``shapes``, the locked image tower); the validation metric ``val_zero_shot_top1`` with its
targets 0.25 and 0.30; AdamW, 10 warm-up steps then a constant rate; evaluations at
``ceil(1.05^k)``; seeds 0, 1, 2; details in each module. Version 2 of the study replaces the
rates' protocol; these stages are not yet rerun under it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError
from contrastive.loss_registry import LOSS_NAMES
from experiments.common import run_dir
from experiments.common.cli import (
    command_parser,
    directory,
    int_list,
    name_list,
    path,
    positive_float,
    positive_int,
)
from experiments.common.grid import compile_cache
from experiments.common.reports import stack_record, write_json
from experiments.study.arms import (
    ARM_NAMES,
    DEFAULT_ARM_SIZES,
    ArmSettings,
    arm_runs,
    arms_report,
    check_arm_names,
    check_arms,
    run_arms,
)
from experiments.study.fixed_budget import (
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
from experiments.study.runs import chosen_rates
from experiments.study.stage_plots import plot_arms, plot_budget

__all__ = [
    "STAGES",
    "ARM_NAMES",
    "DEFAULT_ARM_SIZES",
    "DEFAULT_EXAMPLES",
    "DEFAULT_SIZES",
    "MIN_STEPS",
    "run_stage",
    "build_parser",
]

STAGES = ("fixed-budget", "arms")
V1_RATES = run_dir.RESULTS_DIR / "v1" / "batch_size_study.json"
V1_METRIC, V1_TARGETS, V1_WARMUP = "val_zero_shot_top1", (0.25, 0.30), 10
V1_TRAIN_EXAMPLES = 65536


def build_parser() -> argparse.ArgumentParser:
    """The stages' flags (``python -m experiments.batch_size_study --stage ...``)."""
    p = command_parser("python -m experiments.batch_size_study --stage", __doc__)
    p.add_argument("--stage", choices=STAGES, required=True, help="the stage to run")
    p.add_argument("--rates", default=str(V1_RATES), type=path,
                   help="the version-1 study whose chosen learning rates the runs use")  # fmt: skip
    p.add_argument("--losses", type=name_list, default=list(LOSS_NAMES),
                   help="losses, comma-separated")  # fmt: skip
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help=f"batch sizes; default {','.join(map(str, DEFAULT_SIZES))}")  # fmt: skip
    p.add_argument("--targets", default=",".join(map(str, V1_TARGETS)),
                   help=f"targets of {V1_METRIC}, comma-separated, in (0, 1]")  # fmt: skip
    p.add_argument("--metric", default=V1_METRIC, help="the validation metric of the targets")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="seeds, comma-separated")
    p.add_argument("--train-examples", type=positive_int, default=V1_TRAIN_EXAMPLES,
                   help="training examples")  # fmt: skip
    p.add_argument("--validation-examples", type=positive_int, default=4096,
                   help="validation examples carved from the training split")  # fmt: skip
    p.add_argument("--feature-cache", type=directory, default=None,
                   help="locked tower and features cache; default: <out>/features")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="a progress bar per run")  # fmt: skip
    p.add_argument("--compile-cache", type=directory, default=None,
                   help="JAX's compilation cache; default: <out>/compile_cache")  # fmt: skip
    p.add_argument("--budget-examples", type=positive_int, default=DEFAULT_EXAMPLES,
                   help="training examples every run sees (steps: this / B)")  # fmt: skip
    p.add_argument("--min-steps", type=positive_int, default=MIN_STEPS,
                   help="the largest batch must train at least this many steps")  # fmt: skip
    p.add_argument("--arms", type=name_list, default=",".join(ARM_NAMES),
                   help=f"arms of --stage arms: {', '.join(ARM_NAMES)}")  # fmt: skip
    p.add_argument("--arm-batch-sizes", type=int_list,
                   default=",".join(map(str, DEFAULT_ARM_SIZES)),
                   help="batch sizes of the arms")  # fmt: skip
    p.add_argument("--queue-negatives", type=positive_int, default=1024,
                   help="queue arm: K = this / B - 1 queued steps, B (1 + K) in all")  # fmt: skip
    p.add_argument("--cluster-size", type=positive_int, default=16,
                   help="hard arm: examples per cluster")  # fmt: skip
    p.add_argument("--refresh-epochs", type=positive_float, default=1.0,
                   help="hard arm: re-cluster every this many epochs")  # fmt: skip
    run_dir.add_output_flags(p)
    return p


def _targets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--targets {text!r}: give comma-separated numbers") from None
    if not values or any(not (0 < v <= 1 and math.isfinite(v)) for v in values):
        raise ConfigError(f"--targets {text!r}: every value must be in (0, 1]")
    if len(set(values)) != len(values):
        raise ConfigError(f"--targets {text!r} repeats a value: list each once")
    return sorted(values)


def base_config(args: argparse.Namespace, train_examples: int, out: Path) -> Config:
    """The settings every run of a stage shares (version 1's)."""
    cache = args.feature_cache or str(out / "features")
    return Config().with_updates(
        dataset="shapes",
        train_examples=train_examples,
        validation_examples=args.validation_examples,
        eval_examples=2000,
        locked_image="pretrained",
        text_tower="bag-of-words",
        model="mlp",
        warmup_steps=V1_WARMUP,
        end_lr_ratio=1.0,
        eval_growth=1.05,
        stop_at=f"{args.metric}={max(args.targets):g}",
        feature_cache=cache,
        log_every=10**9,
        keep_checkpoints=1,
        progress=args.progress,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the stage's flags and run it."""
    args = build_parser().parse_args(argv)
    check_arm_names(args.arms)
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {args.seeds} repeats a seed: list each once")
    args.targets = _targets(args.targets)
    return run_stage(args, argv, args.train_examples, "batch_size_study")


def run_stage(
    args: argparse.Namespace, argv: Sequence[str] | None, n_train: int, stem: str
) -> dict:
    """Run ``args.stage``: ``args`` its parsed flags (``targets`` already a list), ``n_train``
    the training examples, ``stem`` the output files' prefix. Returns the stage's record
    (what its JSON holds)."""
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
        "stack": stack_record(),
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
