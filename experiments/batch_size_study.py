"""The batch-size study: steps to a target with a learning rate tuned per batch size.

``python -m experiments.batch_size_study --tune`` (the reduced grid, tuned) and ``--full`` (the
whole grid, tuned) train CLIP-style models on the generated ``shapes``
data set with a locked image tower (SigLiT, Zhai et al. 2023, Fig. 2; LiT, Zhai et al. 2022)
and measure, per loss and batch size, the optimiser steps until a validation metric first
reaches each target, with the learning rate tuned per batch size (Shallue et al. 2018,
"Measuring the Effects of Data Parallelism on Neural Network Training"); then fit McCandlish
et al.'s model ``S = S_min (1 + B_noise / B)`` and report the critical batch size beside the
gradient noise scale measured in the runs (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training").

Protocol, fixed before the first run of this command (the values live in :data:`PRESETS` and
:func:`base_config`, and the report prints every setting from the runs' own configs):

- data: ``shapes``; training examples ``[0, N)`` of its training split, a validation split of
  4,096 examples carved from the same split right after them (never trained on); the test
  split's 2,000 examples (half never-seen (shape, colour) compositions) only in the report.
- model: the image tower locked (an MLP pre-trained once on the five attributes, supervised:
  :func:`contrastive.locked_tower.pretrain_image_tower`; its features are computed once and
  cached), a trainable 256-wide head to 64-d; a bag-of-words text tower with its head;
  temperature learned from the loss's default, the sigmoid loss's bias from -10.
- metric: zero-shot top-1 among all 5,184 captions on the validation split (it does not
  depend on the batch size); targets 0.25 and 0.30 (a pilot run at B = 256 before the study
  reached 0.30 after about 600 steps and levelled off near 0.34: the targets sit where every
  batch size has to learn, below the locked features' ceiling).
- optimiser: AdamW (weight decay 1e-4, gradient norm clipped at 1), 10 warm-up steps, then a
  constant rate (the schedule does not depend on the run's length, so a run can stop at the
  target); evaluation at the steps ``ceil(1.05^k)`` (5 % resolution).
- learning rates: per batch size ``B`` the grid ``r · 4e-3 · sqrt(B / 256)`` for ``r`` in
  ``--lr-factors`` (default 0.25, 0.5, 1, 2); the rate with the fewest steps to a target on
  seed 0 is chosen per (loss, B, target) on validation, then the other seeds run at it.
- caps: a run stops at the higher target or at its cap; the smallest batch's cap is
  ``--first-cap`` steps, each larger batch's is 4x the fewest steps the next smaller batch
  needed for the higher target (at least ``--min-cap``); a run that misses a target is
  reported as "not reached within N steps", never dropped.
- noise scale: the seed runs measure ``B_simple`` every 10 steps (``--noise-scale-every``).
- seeds: 0, 1, 2 (initialisation and data order); steps are reported as mean (min–max).

The main job, ``python -m experiments.batch_size_study`` with no flag, does not tune: it runs
every seed at the learning rates the committed tuned study chose for the first target
(``experiments/results/batch_size_study.json``, or ``--rates FILE`` of any finished study),
3 losses x 4 batch sizes x 3 seeds, steps to the first target, within 15 minutes on 2 cores.

Two more stages run at the committed chosen rates (``--rates``), never tuning; each writes
``batch_size_study_<stage>.{json,md,png}``. Their protocol, fixed before their first run:

``--stage fixed-budget``: is a larger batch better at a fixed number of examples (SimCLR,
Chen et al. 2020, Fig. 9; SigLIP, Zhai et al. 2023, Fig. 2)?

- budget: ``--budget-examples`` 512,000 training examples (7.8 epochs of the 65,536) at
  B = 64, 256, 1024: 8,000, 2,000 and 500 steps; the largest batch trains at least
  ``--min-steps`` 500 steps (a smaller budget is refused);
- rates: per (loss, B) the committed study's choice for its higher target (0.30), the first
  target's where no rate reached it (the report says which);
- as above otherwise: 10 warm-up steps then constant, AdamW, the same model and data; no stop
  at a target; validation at ``ceil(1.05^k)`` (steps to 0.25 and 0.30 from the same runs);
- measured: the final evaluation, after the last step, on the test split (zero-shot top-1 on
  all 2,000 and on the never-seen compositions, recall@1 both ways), mean (min–max) over
  seeds 0, 1, 2; per loss, the batch size with the best mean and whether its range clears
  the others'.

``--stage arms``: hard batches and a negative queue against random batches (details in
:mod:`experiments.common.arms`):

- random: the fixed-budget stage's runs at B = 64, 256, 1024 (in the same ``--out`` they are
  read back): the comparison at the same (B, rate, seed), and the curve of steps to target;
- queue at B = 64 and 256 (``--arm-batch-sizes``): ``K = 1024 / B - 1`` steps (15, 3), so
  every anchor meets ``B (1 + K) = 1024`` candidates (``--queue-negatives``), as in a random
  batch of 1024;
- hard at B = 64 and 256: clusters of 16 (``--cluster-size``) by the image embeddings,
  re-clustered once an epoch (``--refresh-epochs`` 1: 1,024 steps at B = 64, 256 at
  B = 256; a clustering takes effect at an epoch start, so the first epoch is random
  batches), same-caption batch-mates not negatives (``--skip-duplicate-negatives``); why
  these, and what the first random epoch means, in :mod:`experiments.common.arms`;
- each arm: the fixed budget at the random arm's committed rate for (loss, B), seeds 0, 1,
  2; steps to 0.25 and 0.30 and the final test metrics, mean (min–max); the random batch
  size with as many steps (log-log interpolation of the random arm's seed means, never
  extrapolated: "< 64", "> 1024").

``--stage rate-edges --rates STUDY.json``: for every rate a tuned study chose at the lowest or
highest end of its grid, the tuning seed one grid step beyond that end and at the end again,
at the study's own settings and caps; added after the full grid ran, to measure the caveat
its report states (the steps at an end are upper bounds), and changing none of its choices
(protocol in :mod:`experiments.common.rate_edges`). Writes ``<study>_rate_edges.{json,md}``.

Writes ``batch_size_study.{json,md,png}`` (``--tune``), ``batch_size_study_full.{json,md,png}``
(``--full``) or ``batch_size_study_main.{json,md,png}`` (the main job) into a new run
directory (every run's work dir, with its metrics.jsonl curve, under ``runs/``) and prints the
tables, the plot's path and the directory. Started again with ``--out`` of a study or stage cut
short, it resumes; runs of one ``--out`` may be split over processes by ``--losses`` (each
loss's runs depend only on each other), and a last call with every loss reads them all back
into one report.
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
from experiments.common.arms import check_arm_names
from experiments.common.cli import (
    command_parser,
    directory,
    int_list,
    name_list,
    path,
    positive_float,
    positive_int,
    run_main,
)
from experiments.common.grid import compile_cache
from experiments.common.reports import write_json
from experiments.common.stages import (
    ARM_NAMES,
    DEFAULT_ARM_SIZES,
    DEFAULT_EXAMPLES,
    DEFAULT_SIZES,
    MIN_STEPS,
    STAGES,
    run_stage,
)
from experiments.common.study import (
    StudyRun,
    StudyStopped,
    choose_rates,
    chosen_rates,
    fits,
    noise_scales,
    plot_steps,
    run_to_target,
    steps_summary,
    study_report,
)

STEM = "batch_size_study"
COMMITTED = run_dir.RESULTS_DIR / f"{STEM}.json"
METRIC = "val_zero_shot_top1"
TARGETS = (0.25, 0.30)
BASE_LR, BASE_BATCH = 4e-3, 256
WARMUP_STEPS = 10
PRESETS = {
    # the main job: 4 batch sizes, about 15 minutes on 2 cores
    "main": {"batch_sizes": (64, 256, 1024, 4096), "train_examples": 65536, "first_cap": 8000},
    # the full study
    "full": {
        "batch_sizes": (32, 128, 512, 2048, 8192, 16384),
        "train_examples": 131072,
        "first_cap": 20000,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.batch_size_study", __doc__)
    p.add_argument("--tune", action="store_true",
                   help="tune the learning rate per batch size (the reduced grid)")  # fmt: skip
    p.add_argument("--full", action="store_true",
                   help="tune on the full grid, B = 32 .. 16,384 (hours on 2 cores)")  # fmt: skip
    p.add_argument("--rates", default=str(COMMITTED), type=path,
                   help="without --tune/--full: the finished study whose chosen learning rates "
                   "every seed runs at")  # fmt: skip
    p.add_argument("--losses", type=name_list, default=list(LOSS_NAMES),
                   help="losses, comma-separated")  # fmt: skip
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="global batch sizes, comma-separated; default: the preset's")  # fmt: skip
    p.add_argument("--lr-factors", default="0.25,0.5,1,2",
                   help="the learning-rate grid, as factors of 4e-3 * sqrt(B / 256)")  # fmt: skip
    p.add_argument("--targets", default=None,
                   help=f"targets of {METRIC}, comma-separated, in (0, 1]; default: "
                   f"{','.join(map(str, TARGETS))} when tuning, the first alone for the main "
                   "job")  # fmt: skip
    p.add_argument("--metric", default=METRIC, help="the validation metric of the targets")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="seeds, comma-separated")
    p.add_argument("--train-examples", type=positive_int, default=None,
                   help="training examples; default: the preset's")  # fmt: skip
    p.add_argument("--validation-examples", type=positive_int, default=4096,
                   help="validation examples carved from the training split")  # fmt: skip
    p.add_argument("--first-cap", type=positive_int, default=None,
                   help="step cap of the smallest batch; default: the preset's")  # fmt: skip
    p.add_argument("--min-cap", type=positive_int, default=200, help="the smallest step cap")
    p.add_argument("--noise-scale-every", type=int, default=10,
                   help="measure B_simple every K steps in the seed runs (0: off)")  # fmt: skip
    p.add_argument("--feature-cache", type=directory, default=None,
                   help="locked tower and features cache; default: <out>/features")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="a progress bar per run")  # fmt: skip
    p.add_argument("--compile-cache", type=directory, default=None,
                   help="JAX's compilation cache; default: <out>/compile_cache")  # fmt: skip
    g = p.add_argument_group("the fixed-budget and arms stages (at the --rates study's rates)")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="run a stage instead of the study")  # fmt: skip
    g.add_argument("--budget-examples", type=positive_int, default=DEFAULT_EXAMPLES,
                   help="training examples every run of a stage sees (steps: this / B); "
                   f"a stage's batch sizes: {','.join(map(str, DEFAULT_SIZES))}")  # fmt: skip
    g.add_argument("--min-steps", type=positive_int, default=MIN_STEPS,
                   help="the largest batch must train at least this many steps")  # fmt: skip
    g.add_argument("--arms", type=name_list, default=",".join(ARM_NAMES),
                   help=f"arms of --stage arms: {', '.join(ARM_NAMES)}")  # fmt: skip
    g.add_argument("--arm-batch-sizes", type=int_list,
                   default=",".join(map(str, DEFAULT_ARM_SIZES)),
                   help="batch sizes of the arms")  # fmt: skip
    g.add_argument("--queue-negatives", type=positive_int, default=1024,
                   help="queue arm: K = this / B - 1 queued steps, B (1 + K) in all")  # fmt: skip
    g.add_argument("--cluster-size", type=positive_int, default=16,
                   help="hard arm: examples per cluster")  # fmt: skip
    g.add_argument("--refresh-epochs", type=positive_float, default=1.0,
                   help="hard arm: re-cluster every this many epochs")  # fmt: skip
    run_dir.add_output_flags(p)
    return p


def _floats(flag: str, text: str, *, upper: float | None = None) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated numbers") from None
    bad = [v for v in values if not (v > 0 and math.isfinite(v)) or (upper and v > upper)]
    if not values or bad:
        rng = "positive" if upper is None else f"in (0, {upper:g}]"
        raise ConfigError(f"{flag} {text!r}: every value must be {rng}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {text!r} repeats a value: list each once")
    return sorted(values)


def base_config(args: argparse.Namespace, train_examples: int, out: Path) -> Config:
    """The settings every run of the study shares."""
    cache = args.feature_cache or str(out / "features")
    return Config().with_updates(
        dataset="shapes",
        train_examples=train_examples,
        validation_examples=args.validation_examples,
        eval_examples=2000,
        locked_image="pretrained",
        text_tower="bag-of-words",
        model="mlp",
        warmup_steps=WARMUP_STEPS,
        end_lr_ratio=1.0,  # constant after the warm-up
        eval_growth=1.05,
        stop_at=f"{args.metric}={max(args.targets):g}",
        feature_cache=cache,
        log_every=10**9,  # the evaluations (and the noise scale) are the records
        keep_checkpoints=1,
        progress=args.progress,
    )


def learning_rates(batch_size: int, factors: Sequence[float]) -> list[float]:
    """The tuning grid of ``batch_size``: factors of the square-root rule's rate."""
    return [f * BASE_LR * math.sqrt(batch_size / BASE_BATCH) for f in factors]


def run(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_arm_names(args.arms)
    if args.stage:  # at the committed rates: experiments/common/stages.py
        if args.tune or args.full:
            raise ConfigError("--stage runs at the --rates study's rates: drop --tune/--full")
        args.targets = _floats("--targets", args.targets or ",".join(map(str, TARGETS)), upper=1)
        n_train = args.train_examples or PRESETS["main"]["train_examples"]
        return run_stage(args, argv, base_config, n_train, STEM)
    preset = PRESETS["full" if args.full else "main"]
    tuning = args.tune or args.full
    default_targets = TARGETS if tuning else TARGETS[:1]
    args.targets = _floats(
        "--targets", args.targets or ",".join(map(str, default_targets)), upper=1.0
    )
    factors = _floats("--lr-factors", args.lr_factors)
    sizes = sorted(args.batch_sizes or preset["batch_sizes"])
    n_train = args.train_examples or preset["train_examples"]
    first_cap = args.first_cap or preset["first_cap"]
    for loss in args.losses:
        if loss not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {loss!r} in --losses: use {', '.join(LOSS_NAMES)}")
    if len(factors) < 2:
        raise ConfigError("--lr-factors: tuning needs at least two learning rates")
    if max(sizes) > n_train:
        raise ConfigError(
            f"--batch-sizes up to {max(sizes)} exceed the {n_train} training examples: lower "
            "them or raise --train-examples"
        )
    if args.noise_scale_every < 0:
        raise ConfigError("--noise-scale-every must be 0 (off) or positive")
    try:  # the metric, the split, the cache path: checked before the run directory exists
        base_config(args, n_train, Path(args.out or "."))
    except ConfigError as e:
        raise ConfigError(str(e).replace("--stop-at", "--metric")) from None
    given_rates = None
    if not tuning:
        chosen = chosen_rates(args.rates, args.losses, sizes, args.targets)
        given_rates = {k: (v["learning_rate"], v["cap"]) for k, v in chosen.items()}
    # The main job and the full grid never overwrite the reduced tuned study, whose chosen
    # rates the main job reads.
    stem = f"{STEM}_full" if args.full else STEM if tuning else f"{STEM}_main"
    out = run_dir.create(stem, args.out)
    base = base_config(args, n_train, out)
    print(f"run directory: {out}", file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python -m experiments.batch_size_study", *(argv or sys.argv[1:])]),
        "metric": args.metric,
        "targets": args.targets,
        "lr_factors": factors,
        "batch_sizes": sizes,
        "losses": args.losses,
        "seeds": args.seeds,
        "protocol": base.identity(),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    record["mode"] = "tuned" if tuning else f"rates of {args.rates}"
    rows: list[dict] = []
    counter = iter(range(1, 10**6))

    def go(stage: str, loss: str, b: int, lr: float, seed: int, cap: int, **extra) -> dict:
        cfg = base.with_updates(
            loss=loss, batch_size=b, learning_rate=lr, seed=seed, steps=cap,
            checkpoint_every=cap, **extra,
        )  # fmt: skip
        row = run_to_target(
            StudyRun(stage, loss, b, lr, seed, cfg), out, args.metric, args.targets,
            f"{stage} {next(counter)}",
        )  # fmt: skip
        rows.append(row)
        write_json(out / f"{stem}.json", {**record, "rows": rows})
        return row

    with compile_cache(args.compile_cache or out / "compile_cache"):
        if given_rates is not None:  # the main job: every seed at the chosen rates
            for loss in args.losses:
                for b in sizes:
                    lr, cap = given_rates[(loss, b)]
                    for seed in args.seeds:
                        go("seeds", loss, b, lr, seed, cap,
                           noise_scale_every=args.noise_scale_every)  # fmt: skip
            rates = {
                (loss, b, t): given_rates[(loss, b)][0]
                for loss in args.losses
                for b in sizes
                for t in args.targets
            }
        caps = {}
        # 1. Tuning, seed 0: every rate of the grid, batch sizes in increasing order.
        for loss in args.losses if tuning else ():
            cap = first_cap
            for b in sizes:
                caps[(loss, b)] = cap
                tuned = [
                    go("tune", loss, b, lr, args.seeds[0], cap) for lr in learning_rates(b, factors)
                ]
                need = [r["steps_to"][str(max(args.targets))] for r in tuned]
                reached = [s for s in need if s is not None]
                cap = max(args.min_cap, 4 * min(reached)) if reached else cap
        if tuning:
            rates = choose_rates(rows, args.targets)
        # 2. The other seeds at each chosen rate (one run serves every target it was best for).
        for loss in args.losses if tuning else ():
            for b in sizes:
                chosen = sorted({lr for (lo, bb, _), lr in rates.items()
                                 if (lo, bb) == (loss, b) and lr is not None})  # fmt: skip
                for lr in chosen:
                    for seed in args.seeds[1:]:
                        go("seeds", loss, b, lr, seed, caps[(loss, b)],
                           noise_scale_every=args.noise_scale_every)  # fmt: skip
    summary = steps_summary(rows, rates, args.targets)
    fit_rows = fits(summary, args.losses, args.targets)
    noise = noise_scales(rows)
    record.update(
        rows=rows,
        summary=summary,
        fits=fit_rows,
        noise_scale=noise,
        total_time_s=round(time.perf_counter() - t_start, 1),
    )
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out / f"{stem}.json", record)
    text = study_report(record, summary, fit_rows, noise, args.targets)
    (out / f"{stem}.md").write_text(text)
    plot_steps(summary, fit_rows, args.losses, args.targets, out / f"{stem}.png",
               f"shapes, locked image tower, steps to {args.metric}")  # fmt: skip
    if args.update_results:
        run_dir.publish(out, [f"{stem}.{ext}" for ext in ("json", "md", "png")])
    print(text)
    print(f"plot: {out / f'{stem}.png'}")
    print(f"run directory: {out}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> Any:
        try:
            return run(argv)
        except StudyStopped as e:  # a signal: the run saved its checkpoint; exit 0, as train
            print(str(e), file=sys.stderr)
            return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
