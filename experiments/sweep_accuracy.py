"""Accuracy vs batch size at a fixed budget: CLIP-style InfoNCE, sigmoid (SigLIP) and DCL.

``python -m experiments.sweep_accuracy`` trains a two-tower image-text model on the generated
``shapes`` data set (:mod:`contrastive.data.captioned_shapes`) once per (loss, batch size,
seed) and reports zero-shot accuracy and recall@1 as mean ± sample std over the seeds.

The protocol, fixed before the first full run and the same for every loss:

- data: ``shapes``, 32×32 scenes of one object with five attributes, 5,184 captions; the
  test split's 2,000 pairs, half of them (shape, colour) compositions never seen in
  training.
- model: an MLP image tower (:data:`WIDTH` = 128 hidden units, 2 layers) on the raw pixels
  and the data set's text transformer (width 64, depth 2), both with a 256-wide projection
  head to a 64-d embedding; the temperature (and SigLIP's bias, initialised at −10) learned,
  initial temperature the loss's default (InfoNCE 0.07, sigmoid and DCL 0.1).
- budget: a fixed number of training examples (pairs) per run, whatever the batch size:
  ``short`` (default) 2¹⁵ = 32,768, ``long`` 2¹⁸ = 262,144 (``--examples N`` sets any
  other). A run of batch ``B`` takes ``N / B`` steps: at the default, 1,024 steps at B = 32
  and 4 at B = 8,192 (SimCLR's fixed-epoch comparison, Chen et al. 2020, Fig. 9).
- grid: B = 32, 256, 2,048, 8,192; seeds 0, 1, 2 (initialisation and data order).
- learning rate: AdamW (weight decay 1e-4, gradient norm clipped at 1), peak
  ``2e-3 · sqrt(B / 256)`` (square-root scaling, the rule for Adam-type optimisers; Malladi
  et al. 2022), linear warm-up over ⌊steps / 10⌋ steps, then cosine decay to 0.
- metrics (:func:`experiments.train.evaluate`): zero-shot top-1 among all 5,184 captions,
  the same on the never-seen compositions, image→text and text→image recall@1 (a retrieved
  item with the same caption counts). The untrained model of each seed is the baseline.
- spread: sample standard deviation over the seeds (min and max in the JSON).

Each batch size's expected number of hard negatives per anchor (batch-mates one attribute
apart, :func:`~contrastive.data.captioned_shapes.expected_neighbours`) is in the table: 0.16
at B = 32, 43 at B = 8,192.

Writes ``accuracy_sweep.{md,png,json,csv}`` to a new run directory (``--out``; every run's
workdir inside it, under ``runs/``), after every run (a sweep cut short keeps its finished
runs; started again with the same ``--out`` it skips them), and prints the table and the
directory; ``--update-results`` also copies the four files to ``experiments/results/``.

    python -m experiments.sweep_accuracy                    # 36 runs, 20 CPU-minutes
    python -m experiments.sweep_accuracy --budget long      # 8x the examples per run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from contrastive.configs import Config, ConfigError
from contrastive.data.captioned_shapes import expected_neighbours
from experiments.common.cli import command_parser, positive_int
from experiments.common.grid import (
    GridRun,
    SweepSpec,
    add_grid_flags,
    grid_runs,
    learning_rate,
    lr_rule,
    main_of,
)

STEM = "accuracy_sweep"
BUDGETS = {"short": 2**15, "long": 2**18}  # training examples (pairs) per run
BATCH_SIZES = (32, 256, 2048, 8192)
SEEDS = (0, 1, 2)
MODEL, WIDTH = "mlp", 128
BASE_LR = 2e-3  # peak learning rate at B = 256; sqrt(B / 256) elsewhere
METRICS = ("zero_shot_top1", "zero_shot_top1_novel", "i2t_r@1", "t2i_r@1")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.sweep_accuracy", __doc__)
    p.add_argument("--budget", choices=tuple(BUDGETS), default="short",
                   help=f"examples per run: {BUDGETS}")  # fmt: skip
    p.add_argument("--examples", type=positive_int, default=None,
                   help="examples (pairs) per run; overrides --budget")  # fmt: skip
    add_grid_flags(p, batch_sizes=BATCH_SIZES, seeds=SEEDS, model=MODEL, width=WIDTH,
                   base_lr=BASE_LR)  # fmt: skip
    return p


def examples_per_run(args: argparse.Namespace) -> int:
    return BUDGETS[args.budget] if args.examples is None else args.examples


def hard_negatives(batch_size: int) -> str:
    """The table's column: expected batch-mates one attribute apart, per anchor."""
    return f"{expected_neighbours(batch_size):.2f}"


def build(args: argparse.Namespace) -> tuple[SweepSpec, list[GridRun]]:
    """The sweep's spec and its runs; :class:`ConfigError` (one line) for a bad setting."""
    n = examples_per_run(args)
    too_big = [b for b in args.batch_sizes if b > n]
    if too_big:
        raise ConfigError(
            f"--examples {n} is smaller than --batch-sizes {too_big}: every run needs at least "
            "one step; raise --examples or drop those batch sizes"
        )
    runs = grid_runs(args, Config().with_updates(dataset="shapes"), steps_for=lambda b: n // b)
    spec = SweepSpec(
        stem=STEM,
        title=f"shapes, CLIP-style two towers, {n:,} examples per run",
        metrics=METRICS,
        tables=(
            ("zero_shot_top1", "Zero-shot top-1 among 5,184 captions"),
            ("zero_shot_top1_novel", "Zero-shot top-1 on never-seen (shape, colour) pairs"),
            ("i2t_r@1", "Image→text recall@1"),
            ("t2i_r@1", "Text→image recall@1"),
        ),
        panels=(("zero_shot_top1", "zero-shot top-1 (%)"), ("i2t_r@1", "image→text R@1 (%)")),
        notes=(
            f"budget: {n:,} examples per run; steps = examples // batch",
            f"learning rate: {lr_rule(args)}",
            "temperature learned from the loss's default; the sigmoid loss's bias from -10",
        ),
        columns={
            "hard negatives / anchor": hard_negatives,
            "steps": lambda b: str(n // b),
            "peak LR": lambda b: f"{learning_rate(b, args.base_lr):.2g}",
        },
    )
    return spec, runs


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(build_parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
