"""A study call's typed settings: what the flags ask for, checked before any run.

The protocol's constants are not settings (:mod:`experiments.study.protocol`); these are what a
call may choose: which losses, which batch sizes, where, and, for a toy study only, a
shorter pilot, a smaller grid or fewer seeds. Only the protocol's own settings may replace
committed results (:meth:`StudySettings.is_protocol`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from contrastive.configs import Config, ConfigError
from contrastive.loss_registry import LOSS_NAMES
from experiments.study import protocol as P

__all__ = ["StudySettings", "from_flags", "TOY_ONLY"]

TOY_ONLY = ("--pilot-steps", "--rate-exponents", "--seeds")


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What a call of the study command asks for (the protocol's constants are not here)."""

    out: Path
    losses: tuple[str, ...]  # the study's losses: the targets cover all of them
    run_losses: tuple[str, ...]  # the losses this process trains
    batch_sizes: tuple[int, ...]
    train_examples: int
    feature_cache: str
    preset: str  # "reduced", "full" or "custom"
    progress: bool = False
    compile_cache: str | None = None
    seeds: tuple[int, ...] = P.REPORTED_SEEDS
    rate_exponents: tuple[int, ...] = P.RATE_EXPONENTS
    pilot_steps: int | None = None  # None: the protocol's rule (a toy study shortens it)
    main_seeds: tuple[int, ...] | None = None  # the main job's --seeds (None: the protocol's)

    def base(self, stop_at: float | None) -> Config:
        return P.base_config(
            self.train_examples, self.feature_cache, stop_at=stop_at, progress=self.progress
        )

    def pilot_length(self, b: int) -> int:
        return self.pilot_steps or P.pilot_steps(b, self.train_examples)

    def is_protocol(self) -> bool:
        """Whether this is the protocol's study: only then may it replace committed results."""
        preset = P.PRESETS.get(self.preset)
        return (
            preset is not None
            and tuple(self.batch_sizes) == tuple(preset["batch_sizes"])
            and self.train_examples == preset["train_examples"]
            and tuple(self.seeds) == P.REPORTED_SEEDS
            and tuple(self.rate_exponents) == P.RATE_EXPONENTS
            and self.pilot_steps is None
            and set(self.losses) == set(self.run_losses) == set(LOSS_NAMES)
        )


def from_flags(args: argparse.Namespace, argv: Sequence[str]) -> StudySettings:
    """The typed settings of a call; ConfigError (one line) for any that cannot run."""
    tuning = args.tune or args.full
    # The small-batches stage tunes its arms' rates and trains seeds: a toy one may shorten both.
    toy_ok = (
        tuning or getattr(args, "small_batches", False) or getattr(args, "adaptive_batch", False)
    )
    preset_name = "full" if args.full else "reduced"
    preset = P.PRESETS[preset_name]
    given = [f for f in TOY_ONLY if any(a == f or a.startswith(f + "=") for a in argv)]
    main_job = not (toy_ok or getattr(args, "noise_scale", False))
    given = [f for f in given if not (f == "--seeds" and main_job)]  # which seeds it reruns
    if given and not toy_ok:
        raise ConfigError(f"{given[0]} applies to a tuned study: add --tune (or drop it)")
    for flag, names in (("--losses", args.losses), ("--run-losses", args.run_losses or [])):
        unknown = [x for x in names if x not in LOSS_NAMES]
        if unknown:
            raise ConfigError(f"{flag}: unknown loss {unknown[0]!r}: use {', '.join(LOSS_NAMES)}")
    run_losses = args.run_losses or args.losses
    if not set(run_losses) <= set(args.losses):
        raise ConfigError("--run-losses must be among --losses (the study's losses)")
    for flag, values in (("--losses", args.losses), ("--run-losses", run_losses),
                         ("--batch-sizes", args.batch_sizes), ("--seeds", args.seeds),
                         ("--rate-exponents", args.rate_exponents)):  # fmt: skip
        if values and len(set(values)) != len(values):
            raise ConfigError(
                f"{flag} {','.join(map(str, values))} repeats a value: list each once"
            )
    sizes = tuple(sorted(args.batch_sizes or preset["batch_sizes"]))
    n_train = args.train_examples or preset["train_examples"]
    if n_train < 1:
        raise ConfigError(f"--train-examples must be positive, got {n_train}")
    if args.pilot_steps is not None and args.pilot_steps < 20:
        raise ConfigError("--pilot-steps must be at least 20 (a plateau needs evaluations)")
    if args.rate_exponents is not None and len(args.rate_exponents) < 2:
        raise ConfigError("--rate-exponents: tuning needs at least two rates")
    if args.seeds is not None and P.TUNING_SEED in args.seeds:
        raise ConfigError(f"--seeds: seed {P.TUNING_SEED} tunes the rates; it is never reported")
    try:
        P.check_sizes(sizes, n_train)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(args.out) if args.out else None
    s = StudySettings(
        out=out or Path("."),
        losses=tuple(args.losses),
        run_losses=tuple(run_losses),
        batch_sizes=sizes,
        train_examples=n_train,
        feature_cache=args.feature_cache or "",
        preset=preset_name if args.batch_sizes is None else "custom",
        progress=args.progress,
        compile_cache=args.compile_cache,
        seeds=tuple(args.seeds or P.REPORTED_SEEDS),
        rate_exponents=tuple(args.rate_exponents or P.RATE_EXPONENTS),
        pilot_steps=args.pilot_steps,
        main_seeds=None if tuning or args.seeds is None else tuple(args.seeds),
    )
    if args.update_results and not (toy_ok or getattr(args, "noise_scale", False)):
        raise ConfigError(
            "--update-results: the main job publishes nothing (it checks the committed "
            "study); use it with --tune, --full or --noise-scale"
        )
    if args.update_results and not s.is_protocol():
        raise ConfigError(
            "--update-results replaces the committed results only with the protocol's own "
            "settings (its batch sizes, examples, seeds and grid, every loss in one process): "
            "drop the other flags or --update-results"
        )
    s.base(None)  # every shared setting checked before the run directory exists
    return s
