"""The batch-size study's protocol: every constant and rule, stated once.

The numbered protocol is in :mod:`experiments.study`'s docstring; this module is where the
code reads it from, so that a rule changed here is changed everywhere (the sweeps share the
square-root rate rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from contrastive.configs import Config
from experiments.common.grid import BASE_BATCH, learning_rate

__all__ = [
    "VERSION",
    "METRIC",
    "SECOND_METRIC",
    "BASE_LR",
    "BASE_BATCH",
    "WARMUP_STEPS",
    "EVAL_GROWTH",
    "RATE_EXPONENTS",
    "MAX_EXTENSIONS",
    "TUNING_SEED",
    "REPORTED_SEEDS",
    "PILOT_SEED",
    "MARGIN_SD",
    "TARGET_STEP",
    "EASIER_OFFSET",
    "PRESETS",
    "rule_rate",
    "rate",
    "pilot_steps",
    "cap_from_pilot",
    "base_config",
]

VERSION = 2
METRIC = "val_zero_shot_xent"  # nats, lower is better
SECOND_METRIC = "val_zero_shot_top1"
BASE_LR = 4e-3  # the square-root rule's rate at BASE_BATCH (256), shared with the sweeps
WARMUP_STEPS = 10  # steps are counted after these
EVAL_GROWTH = 1.05  # evaluations at ceil(1.05^k): 5 % resolution in steps
RATE_EXPONENTS = tuple(range(-4, 3))  # 2^k times the rule's rate: 1/16 .. 4
MAX_EXTENSIONS = 4  # the grid grows by at most this many factors of 2 beyond each end
TUNING_SEED = 0  # chooses the rates; never in a reported mean
REPORTED_SEEDS = (1, 2, 3, 4, 5)
MAIN_JOB_SEEDS = REPORTED_SEEDS  # the main job reruns all of them (about 9 min on 2 cores)
PILOT_SEED = 1000  # sets the targets; never reported
PILOT_EPOCHS, PILOT_MIN_STEPS = 8, 500
PLATEAU_SHARE = 0.3  # the plateau: the evaluations in the last 30 % of the pilot's steps
MARGIN_SD = 3.0  # every cell clears a target by this many evaluation-noise SDs
TARGET_STEP = 0.05  # targets are rounded up to a multiple of this (nats)
EASIER_OFFSET = 0.5  # the easier target lies this many nats above the harder
MIN_CAP, CAP_FACTOR = 200, 4
VALIDATION_EXAMPLES = 4096
BOOTSTRAP_RESAMPLES, INTERVAL = 2000, 0.90
RESIDUAL_FLAG = 1.5  # a point whose measured / model ratio is beyond this is flagged

PRESETS: dict[str, dict[str, Any]] = {
    # the reduced study, whose rates the main job reruns: 4 batch sizes
    "reduced": {"batch_sizes": (64, 256, 1024, 4096), "train_examples": 65536},
    "full": {"batch_sizes": (32, 128, 512, 2048, 8192, 16384), "train_examples": 131072},
}


def rule_rate(batch_size: int) -> float:
    """The square-root rule's learning rate at ``batch_size`` (Krizhevsky 2014; Hoffer et
    al. 2017): ``BASE_LR * sqrt(B / BASE_BATCH)``, the centre of every tuning grid."""
    return learning_rate(batch_size, BASE_LR)


def rate(batch_size: int, exponent: int) -> float:
    """The grid's rate ``2^exponent`` times the rule's at ``batch_size``."""
    return rule_rate(batch_size) * 2.0**exponent


def pilot_steps(batch_size: int, train_examples: int) -> int:
    """The pilot's length: ``PILOT_EPOCHS`` epochs, at least ``PILOT_MIN_STEPS`` steps."""
    return max(PILOT_MIN_STEPS, math.ceil(PILOT_EPOCHS * train_examples / batch_size))


def cap_from_pilot(pilot_steps_to_harder: int | None, pilot_length: int) -> int:
    """Every run of a cell stops at this step: 4x the pilot's steps (counted from step 0) to
    the harder target, at least ``MIN_CAP``; twice the pilot's length if it never got there."""
    if pilot_steps_to_harder is None:
        return 2 * pilot_length
    return max(MIN_CAP, CAP_FACTOR * pilot_steps_to_harder)


def base_config(
    train_examples: int, feature_cache: str, *, stop_at: float | None, progress: bool = False
) -> Config:
    """The settings every run of the study shares (a run adds loss, B, rate, seed, steps)."""
    return Config().with_updates(
        dataset="shapes",
        train_examples=train_examples,
        validation_examples=VALIDATION_EXAMPLES,
        eval_examples=VALIDATION_EXAMPLES,  # every validation example is scored
        locked_image="pretrained",
        text_tower="bag-of-words",
        model="mlp",
        warmup_steps=WARMUP_STEPS,
        end_lr_ratio=1.0,  # constant after the warm-up: a run can stop at its target
        eval_growth=EVAL_GROWTH,
        stop_at=None if stop_at is None else f"{METRIC}={stop_at:g}",
        feature_cache=feature_cache,
        log_every=10**9,  # the evaluations are the records
        keep_checkpoints=1,
        progress=progress,
    )


def protocol_settings(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` that mean something in the study's mode: those a run varies,
    unset ones and the trainable image tower's (the tower is locked) left out."""
    varies = {"--loss", "--batch-size", "--learning-rate", "--seed", "--steps", "--stop-at"}
    unused = {"--width", "--depth", "--image-size", "--dropout", "--hard-negatives",
              "--hard-batches", "--cluster-size", "--refresh-every", "--cluster-tower",
              "--skip-duplicate-negatives", "--negative-queue", "--stream", "--momentum",
              "--trust-coefficient", "--shard-optimizer"}  # fmt: skip
    return {
        k: v
        for k, v in cfg.identity().items()
        if v is not None and k not in varies and k not in unused
    }


def round_up(value: float, step: float = TARGET_STEP) -> float:
    """``value`` rounded up to a multiple of ``step`` (a target only gains margin)."""
    return round(math.ceil(value / step - 1e-9) * step, 10)


def check_sizes(sizes: Sequence[int], train_examples: int) -> None:
    """ValueError (one line) for batch sizes the study cannot run."""
    bad = [b for b in sizes if b < 2]
    if bad:
        raise ValueError(f"--batch-sizes {bad}: every batch size must be at least 2 pairs")
    if max(sizes) > train_examples:
        raise ValueError(
            f"--batch-sizes up to {max(sizes)} exceed the {train_examples} training examples: "
            "lower them or raise --train-examples"
        )
