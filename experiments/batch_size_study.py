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

Writes ``batch_size_study.{json,md,png}`` (tuned) or ``batch_size_study_main.{json,md,png}``
(the main job) into a new run directory (every run's work dir,
with its metrics.jsonl curve, under ``runs/``) and prints the tables, the plot's path and the
directory. Started again with ``--out`` of a study cut short, it resumes.
"""

from __future__ import annotations

import argparse
import json
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
    positive_int,
    run_main,
)
from experiments.common.grid import compile_cache
from experiments.common.reports import loss_label, write_json
from experiments.common.study import (
    StudyRun,
    choose_rates,
    fits,
    plot_steps,
    run_to_target,
    steps_summary,
    steps_table,
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
    given_rates = None if tuning else _committed_rates(args.rates, args.losses, sizes, args.targets)
    stem = STEM if tuning else f"{STEM}_main"  # the main job never overwrites the tuned study
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

    with compile_cache(out / "compile_cache"):
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
    noise = _noise_scales(rows)
    record.update(
        rows=rows,
        summary=summary,
        fits=fit_rows,
        noise_scale=noise,
        total_time_s=round(time.perf_counter() - t_start, 1),
    )
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out / f"{stem}.json", record)
    text = report(record, summary, fit_rows, noise, args)
    (out / f"{stem}.md").write_text(text)
    plot_steps(summary, fit_rows, args.losses, args.targets, out / f"{stem}.png",
               f"shapes, locked image tower, steps to {args.metric}")  # fmt: skip
    if args.update_results:
        run_dir.publish(out, [f"{stem}.{ext}" for ext in ("json", "md", "png")])
    print(text)
    print(f"plot: {out / f'{stem}.png'}")
    print(f"run directory: {out}")
    return record


def _committed_rates(
    path_: str, losses: Sequence[str], sizes: Sequence[int], targets: Sequence[float]
) -> dict[tuple[str, int], tuple[float, int]]:
    """``{(loss, B): (rate, cap)}`` from a finished study's JSON: the rate chosen for the
    highest target that one of its rates reached, and that batch size's step cap."""
    try:
        study = json.loads(Path(path_).read_text())
        summary, rows = study["summary"], study["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--rates {path_}: not a finished study ({type(e).__name__}); run with --tune to "
            "choose the rates first"
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
                    f"--rates {path_} has no chosen rate for {loss} at B = {b}: run with --tune"
                )
            out[(loss, b)] = (chosen[0]["learning_rate"], max(caps))
    return out


def _noise_scales(rows: Sequence[dict]) -> list[dict]:
    """B_simple per (loss, batch): early (first measurement), middle and last, seed mean."""
    out: dict[tuple, list] = {}
    for r in rows:
        if r.get("noise_b_simple"):
            out.setdefault((r["loss"], r["batch_size"]), []).append(r["noise_b_simple"])
    result = []
    for (loss, b), series in sorted(out.items()):
        pick = lambda s, i: s[min(i, len(s) - 1)][1] if s else None
        first = [pick(s, 0) for s in series]
        mid = [pick(s, len(s) // 2) for s in series]
        last = [pick(s, len(s) - 1) for s in series]
        mean = lambda v: sum(v) / len(v)
        result.append({"loss": loss, "batch_size": b, "first": mean(first),
                       "middle": mean(mid), "last": mean(last), "runs": len(series)})  # fmt: skip
    return result


def report(record: dict, summary: list, fit_rows: list, noise: list, args) -> str:
    """The Markdown report: protocol, steps tables, fits beside the noise scale."""
    lines = ["## Steps to target against batch size (shapes, locked image tower)", ""]
    lines.append(f"- metric: `{record['metric']}`; targets {', '.join(map(str, args.targets))}")
    lines.append(f"- learning-rate grid: {record['lr_factors']} x 4e-3 * sqrt(B / 256); "
                 "chosen per (loss, B, target) on seed 0's validation curve")  # fmt: skip
    lines.append(f"- seeds {record['seeds']}; steps as mean (min–max) over seeds")
    fixed = ", ".join(f"`{k} {v}`" for k, v in record["protocol"].items()
                      if k not in ("--loss", "--batch-size", "--learning-rate", "--seed",
                                   "--steps"))  # fmt: skip
    lines.append(f"- the same in every run: {fixed}")
    for t in args.targets:
        lines += ["", f"Steps to {record['metric']} >= {t:g}:", ""]
        lines.append(steps_table(summary, args.losses, t))
    lines += ["", "McCandlish fit `S = S_min (1 + B_noise / B)` on the seed means "
              "(batch sizes where every seed reached the target):", ""]  # fmt: skip
    lines += ["| loss | target | S_min | E_min | B_crit | rel. rms residual | points |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for f in fit_rows:

        def num(k, f=f):
            return "-" if f.get(k) is None else f"{f[k]:.3g}"

        lines.append(
            f"| {loss_label(f['loss'])} | {f['target']:g} | {num('s_min')} | {num('e_min')} | "
            f"{num('b_crit')} | {num('relative_rms_residual')} | {len(f['batch_sizes'])} |"
        )
    if noise:
        lines += ["", "Gradient noise scale B_simple measured in the seed runs (mean over "
                  "seeds; first, middle and last measurement of each run):", ""]  # fmt: skip
        lines += ["| loss | batch | first | middle | last |", "|---|---:|---:|---:|---:|"]
        for n in noise:
            lines.append(f"| {loss_label(n['loss'])} | {n['batch_size']} | {n['first']:.3g} | "
                         f"{n['middle']:.3g} | {n['last']:.3g} |")  # fmt: skip
    lines.append(f"\nTotal time {record.get('total_time_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
