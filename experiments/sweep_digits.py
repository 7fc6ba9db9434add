"""Accuracy vs batch size on the digits, SimCLR-style: InfoNCE (NT-Xent), sigmoid and DCL.

``python -m experiments.sweep_digits`` trains one image encoder per (loss, batch size, seed)
on two augmented views of the offline scikit-learn digits (1,438 training images of 8×8,
upsampled to 16×16; prepared on first use, nothing downloads) and probes its frozen
features: linear-probe and k-NN accuracy on the test split, mean ± sample std over seeds.

Protocol (the same for every loss):

- model: a GroupNorm ResNet of width 4 (4/8/16 channels, 16 features) and a 256-wide
  projection head to 64-d; the probes read the features before the head (SimCLR). The
  encoder is tiny on purpose: wider encoders' *random* features already reach 80–99 % on
  these digits, which would leave nothing for training to show.
- budget: a fixed number of epochs per run (``--epochs``, default 10), so every batch size
  sees the same examples: ``ceil(epochs · 1,438 / B)`` steps (SimCLR's Fig. 9 comparison).
- grid: B = 64, 256, 1,024; seeds 0, 1, 2.
- losses: the softmax losses in SimCLR's NT-Xent form (``--intra-view``: the other view's
  2B - 2 same-batch images are negatives too); sigmoid as in SigLIP (bias initialised at
  −10); temperatures learned from the loss's default.
- learning rate: AdamW, peak ``2e-3 · sqrt(B / 256)``, warm-up ⌊steps / 10⌋ steps, cosine
  decay to 0 (:func:`experiments.common.grid.learning_rate`).

The report lists every setting of the runs, read from their configs.
- the untrained encoder of each seed is the baseline.

Writes ``digits_sweep.{md,png,json,csv}`` to a new run directory (``--out``) and prints the
table and the directory; ``--update-results`` also copies them to ``experiments/results/``.

    python -m experiments.sweep_digits                       # 27 runs, 11 CPU-minutes
    python -m experiments.sweep_digits --epochs 20 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from contrastive.configs import Config, ConfigError
from contrastive.data import get_spec, load_source
from contrastive.loss_registry import LOSSES
from experiments.common.cli import command_parser, directory
from experiments.common.grid import (
    GridRun,
    SweepSpec,
    add_grid_flags,
    grid_runs,
    learning_rate,
    lr_rule,
    main_of,
)

STEM = "digits_sweep"
BATCH_SIZES = (64, 256, 1024)
SEEDS = (0, 1, 2)
MODEL, WIDTH = "resnet", 4
BASE_LR = 2e-3
METRICS = ("linear_probe", "knn")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.sweep_digits", __doc__)
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the training split")
    p.add_argument("--data-dir", type=directory, default=None,
                   help="TFDS data dir; none: ~/tensorflow_datasets")  # fmt: skip
    add_grid_flags(p, batch_sizes=BATCH_SIZES, seeds=SEEDS, model=MODEL, width=WIDTH,
                   base_lr=BASE_LR)  # fmt: skip
    return p


def build(args: argparse.Namespace) -> tuple[SweepSpec, list[GridRun]]:
    """The sweep's spec and its runs; :class:`ConfigError` (one line) for a bad setting."""
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise ConfigError(f"--epochs must be positive and finite, got {args.epochs}")
    try:
        n_train = len(load_source("digits", get_spec("digits").train_split, args.data_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def steps_for(b: int) -> int:
        return max(1, math.ceil(args.epochs * n_train / b))

    base = Config().with_updates(dataset="digits", data_dir=args.data_dir)
    runs = grid_runs(
        args,
        base,
        steps_for=steps_for,
        loss_updates=lambda loss: {"intra_view": "intra_view" in LOSSES[loss].options},
    )
    spec = SweepSpec(
        stem=STEM,
        title=f"digits, SimCLR-style, {args.epochs:g} epochs per run",
        metrics=METRICS,
        tables=(
            ("linear_probe", "Linear-probe accuracy on the test split"),
            ("knn", "k-NN accuracy on the test split"),
        ),
        panels=(("linear_probe", "linear-probe accuracy (%)"), ("knn", "k-NN accuracy (%)")),
        notes=(
            f"budget: {args.epochs:g} epochs per run; steps = ceil(epochs * {n_train} / batch)",
            "softmax losses in NT-Xent form (--intra-view); probes on the features before the head",
            f"learning rate: {lr_rule(args)}",
        ),
        columns={
            "steps": lambda b: str(steps_for(b)),
            "peak LR": lambda b: f"{learning_rate(b, args.base_lr):.2g}",
        },
    )
    return spec, runs


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(build_parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
