"""The batch-size study: steps to a target against batch size, with rates tuned per batch size.

``python -m experiments.batch_size_study`` (the main job) trains seeds 1-5 (``--seeds``: some
of them) of every (loss, B) of the committed reduced study again, at the
learning rates that study chose (it tunes nothing), and prints its table beside the
committed one: it reproduces within noise, or names the cells that do not; and how many
cells took exactly the committed steps, seed by seed.

``--tune`` runs the reduced study (B = 64 .. 4,096) by the protocol, ``--full`` the full one
(B = 32 .. 16,384; hours on 2 cores: split it over processes with ``--run-losses`` on one
``--out``). The protocol, fixed before the first run, is in :mod:`experiments.study`: a smooth
metric (validation zero-shot cross-entropy), targets every batch size clears with margin,
rates pinned inside a self-extending grid, five seeds that did not tune, log-space fits with
seed-bootstrap intervals, verdicts only where intervals separate.

Stages on the committed study (its targets, rates and runs), each with its rules fixed
before its runs in its module: ``--noise-scale`` (B_simple beside B_crit,
:mod:`experiments.study.noise_scale`), ``--small-batches`` (SogCLR and iSogCLR against
InfoNCE, :mod:`experiments.study.small_batches`), ``--adaptive-batch`` (a batch that grows
with B_simple against fixed ones, :mod:`experiments.study.adaptive_batch`).

``--stage fixed-budget|arms`` runs a stage at protocol version 1's rates
(:mod:`experiments.study.stages`, its own flags).

Writes ``<stem>.{json,md,png}`` into a run directory it prints (``runs/<stem>-<time>/`` or
``--out``); started again with the same ``--out`` it resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from contrastive.configs import ConfigError
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
from experiments.common.reports import stack_record, write_json
from experiments.study import protocol as P
from experiments.study import report, stages
from experiments.study.adaptive_batch import adaptive_markdown, run_adaptive
from experiments.study.harness import StudyStopped
from experiments.study.noise_scale import noise_markdown, run_noise
from experiments.study.settings import from_flags
from experiments.study.small_batches import (
    ARMS,
    BUDGET_EXAMPLES,
    check_small_batches,
    run_small_batches,
    stage_sizes,
)
from experiments.study.small_batches_report import small_batches_markdown
from experiments.study.steps_to_target import committed_cells, reproduce, rerun_seeds, run_study

STEM = "batch_size_study"
COMMITTED = run_dir.RESULTS_DIR / f"{STEM}.json"
SMALL_BATCH_FLAGS = ("--small-batch-arms", "--budget-examples")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.batch_size_study", __doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tune", action="store_true", help="run the reduced study, B = 64 .. 4,096")
    mode.add_argument("--full", action="store_true", help="run the full study, B = 32 .. 16,384")
    mode.add_argument("--noise-scale", action="store_true",
                      help="measure the gradient noise scale B_simple on the committed study's "
                      "runs (B = 256 and 1,024, seeds 1-5, m = 32 batches at three "
                      "checkpoints) and set it beside the fitted B_crit")  # fmt: skip
    mode.add_argument("--small-batches", action="store_true",
                      help="SogCLR and iSogCLR (global-infonce) against InfoNCE, its queue and "
                      "a larger InfoNCE batch at B = 64 and 256: rates tuned on seed 0, seeds "
                      "1-5 at a fixed budget (experiments/study/small_batches.py)")  # fmt: skip
    mode.add_argument("--adaptive-batch", action="store_true",
                      help="an adaptive batch size (B = 64 growing to 4,096 by the measured "
                      "B_simple, two growth factors, seeds 1-5) against the committed fixed "
                      "batch sizes (experiments/study/adaptive_batch.py)")  # fmt: skip
    p.add_argument("--small-batch-arms", type=name_list, default=list(ARMS),
                   help="--small-batches: the arms to train (processes on one --out may split "
                   "them; a last call with every arm reads their runs back and writes the "
                   "whole report)")  # fmt: skip
    p.add_argument("--budget-examples", type=positive_int, default=BUDGET_EXAMPLES,
                   help="--small-batches: training examples of every seed run")  # fmt: skip
    p.add_argument("--rates", default=str(COMMITTED), type=path,
                   help="the committed tuned study that the main job and --noise-scale read "
                   "(its rates, steps and fits)")  # fmt: skip
    p.add_argument("--losses", type=name_list, default=list(LOSS_NAMES),
                   help="the study's losses (the targets cover all of them)")  # fmt: skip
    p.add_argument("--run-losses", type=name_list, default=None,
                   help="the losses this process trains (default: all of --losses); other "
                   "processes on the same --out train the rest")  # fmt: skip
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="batch sizes (default: the preset's; others make a study that may "
                   "not replace committed results)")  # fmt: skip
    p.add_argument("--train-examples", type=int, default=None, help="default: the preset's")
    p.add_argument("--pilot-steps", type=int, default=None,
                   help="a toy study: every pilot's length (default: the rule)")  # fmt: skip
    p.add_argument("--rate-exponents", type=int_list, default=None,
                   help="a toy study: the base rate grid's exponents k of 2^k")  # fmt: skip
    p.add_argument("--seeds", type=int_list, default=None,
                   help="a toy study: the reported seeds (default 1-5); the main job: which "
                   "of the committed seeds it trains again (default all, 1-5)")  # fmt: skip
    p.add_argument("--feature-cache", type=directory, default=None,
                   help="locked tower and features cache; default: <out>/features")  # fmt: skip
    p.add_argument("--compile-cache", type=directory, default=None,
                   help="JAX's compilation cache; default: <out>/compile_cache")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="a progress bar per run")  # fmt: skip
    run_dir.add_output_flags(p)
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--stage" or a.startswith("--stage=") for a in argv):
        return stages.main(argv)
    args = build_parser().parse_args(argv)
    for flag in SMALL_BATCH_FLAGS:  # a setting of one stage is never silently ignored
        if not args.small_batches and any(a == flag or a.startswith(f"{flag}=") for a in argv):
            raise ConfigError(f"{flag} is a setting of --small-batches: add it, or drop {flag}")
    s = from_flags(args, argv)
    tuning = args.tune or args.full
    stem = f"{STEM}_full" if args.full else STEM if tuning else f"{STEM}_main"
    if args.noise_scale:
        stem = f"{STEM}_noise"
    if args.adaptive_batch:
        stem = f"{STEM}_adaptive"
    if args.small_batches:
        stem = f"{STEM}_small_batches"
        sizes, _ = stage_sizes(s)
        check_small_batches(args.small_batch_arms, sizes, s.train_examples, args.budget_examples)
    if not tuning:  # the committed study must answer for every cell before any run
        committed = committed_cells(args.rates, s.run_losses, s.batch_sizes)["study"]
        if not (args.noise_scale or args.small_batches or args.adaptive_batch):
            rerun_seeds(s, committed, args.rates)
    out = run_dir.create(stem, args.out)
    s = dataclasses.replace(s, out=out, feature_cache=s.feature_cache or str(out / "features"))
    print(f"run directory: {out}", file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "command": " ".join(["python -m experiments.batch_size_study", *argv]),
        "protocol_version": P.VERSION,
        "losses": list(s.losses),
        "batch_sizes": list(s.batch_sizes),
        "seeds": list(s.seeds),
        "settings": P.protocol_settings(s.base(None)),
        "stack": stack_record(),  # the versions and the machine behind every row
    }
    if tuning:
        record = run_study(s, record)
        if not record["complete"]:
            print(f"this process's losses are done; the report waits for the others' rows in "
                  f"{out} (run the same command with every --run-losses)")  # fmt: skip
            return record
        text = report.study_markdown(record)
        report.plot_study(record, out / f"{stem}.png")
        names = [f"{stem}.{ext}" for ext in ("json", "md", "png")]
    elif args.noise_scale:
        study = committed_cells(args.rates, s.run_losses, s.batch_sizes)["study"]
        record = run_noise(s, study, {**record, "rates": str(args.rates)})
        text = noise_markdown(record)
        names = [f"{stem}.{ext}" for ext in ("json", "md")]
    elif args.adaptive_batch:
        study = committed_cells(args.rates, ["infonce"], [])["study"]
        record = run_adaptive(s, study, {**record, "rates": str(args.rates)})
        text = adaptive_markdown(record)
        names = [f"{stem}.{ext}" for ext in ("json", "md")]
    elif args.small_batches:
        study = committed_cells(args.rates, ["infonce"], [])["study"]
        record = run_small_batches(s, study, args.small_batch_arms, args.budget_examples,
                                   {**record, "rates": str(args.rates)})  # fmt: skip
        text = small_batches_markdown(record)
        names = [f"{stem}.{ext}" for ext in ("json", "md")]
    else:
        record = reproduce(s, args.rates, {**record, "rates": str(args.rates)})
        text = report.reproduction_markdown(record)
        names = [f"{stem}.{ext}" for ext in ("json", "md")]
    (out / f"{stem}.md").write_text(text)
    write_json(out / f"{stem}.json", record)
    stage = args.noise_scale or args.small_batches or args.adaptive_batch
    if args.update_results and (tuning or stage):
        run_dir.publish(out, names)
    print(text)
    print(f"run directory: {out}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> Any:
        try:
            return run(argv)
        except StudyStopped as e:  # a signal: the run saved its checkpoint
            print(str(e), file=sys.stderr)
            return 130

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
