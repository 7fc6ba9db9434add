"""The configuration of a training run: one tree of frozen dataclasses, in one module.

``Config`` holds ``DataConfig`` (which data), ``ModelConfig`` (the dual encoder),
``TrainConfig`` (the train step: ``LossConfig``, ``OptimConfig``, gradient cache, optimiser
sharding), ``RunConfig`` (batch, seed, bookkeeping) and ``HostsConfig`` (several processes).
Every field is made with :func:`contrastive.settings.setting`, which states its default, help,
flag and allowed values once; the CLI's flags are generated from this tree
(:func:`parse_config`), and a sweep changes a tree with :meth:`Config.with_updates`. Nothing is
overridden behind the tree's back: what a field says is what runs.

>>> cfg = Config().with_updates(loss="sigmoid", batch_size=1024, learning_rate=1e-3)
>>> cfg.train.loss.name, cfg.run.batch_size, cfg.init_bias
('sigmoid', 1024, -10.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from contrastive.config_checks import check_config, parse_stop_at
from contrastive.data.pipeline import DATASETS, get_spec
from contrastive.models import IMAGE_ENCODERS
from contrastive.settings import (
    ConfigError,
    build_tree,
    check_fields,
    field_name,
    flag_of,
    flag_parser,
    setting,
    tree_values,
    walk,
)
from contrastive.step_configs import (
    GLOBAL_SETTINGS,
    OPTIMIZERS,
    LossConfig,
    OptimConfig,
    TrainConfig,
    local_chunk_size,
)

__all__ = [
    "ConfigError",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "HostsConfig",
    "Config",
    "OPTIMIZERS",
    "differences",
    "local_chunk_size",
    "build_parser",
    "parse_config",
]

TEXT_TOWERS = ("transformer", "bag-of-words")
# The adaptive batch's settings, added after runs were checkpointed: at their defaults they
# are left out of a run's identity (as GLOBAL_SETTINGS), so that those runs still resume.
ADAPTIVE_SETTINGS = frozenset(
    ("adaptive_batch", "max_batch_size", "adaptive_factor", "adaptive_lr")
)
# ------------------------------------------------------------------ data, model, run, hosts


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set, where it lives, how much of it evaluation reads."""

    dataset: str = setting(
        "digits",
        f"data set, one of {', '.join(DATASETS)} (digits: offline, from scikit-learn), or a "
        "directory of own image-text pairs prepared by python -m experiments.prepare_pairs",
    )
    data_dir: str | None = setting(
        None, "TFDS data dir; none: ~/tensorflow_datasets", changes_run=False, path=True
    )
    image_size: int | None = setting(
        None, "side of the square model input; none: the data set's", at_least=4
    )
    eval_examples: int = setting(
        10000, "at most this many examples per split for evaluation", at_least=1, changes_run=False
    )
    train_examples: int | None = setting(
        None,
        "train on the first N examples of the training split (shapes generates N); none: all",
        at_least=1,
    )
    validation_examples: int = setting(
        0,
        "carve a validation split of this many examples from the training split, right after "
        "the training examples (never trained on); evaluations then add val_* metrics",
        at_least=0,
    )
    hard_negatives: int = setting(
        0,
        "K extra captions per image, each one attribute away from its own, as negatives for "
        "every image (retrieval-style batches of B images and (1 + K) B captions; shapes)",
        at_least=0,
    )
    skip_duplicate_negatives: bool = setting(
        False,
        "give the loss each caption's id: a batch-mate or extra negative with an image's own "
        "caption is not its negative (shapes)",
    )
    hard_batches: bool = setting(
        False,
        "hard batches (NGAME): every --refresh-every steps cluster the training set by the "
        "current model's embeddings and draw each batch as whole clusters of similar examples, "
        "so in-batch negatives are near each other; before the first refresh, random batches",
    )
    cluster_size: int = setting(
        16, "hard batches: examples per cluster (a divisor of the batch size)", at_least=1
    )
    refresh_every: int = setting(
        100,
        "hard batches: re-cluster the training set after every K steps, at the next epoch "
        "start (where a clustering takes effect; K shorter than an epoch: every epoch)",
        at_least=1,
    )
    cluster_tower: str = setting(
        "image", "hard batches: the tower whose embeddings are clustered", choices=("image", "text")
    )

    def __post_init__(self):
        check_fields(self)
        try:  # a known name or a prepared directory, else one line naming the flag
            get_spec(self.dataset)
        except ValueError as e:
            raise ValueError(f"{field_name(self, 'dataset')}: {e}") from None
        wants_ids = self.hard_negatives or self.skip_duplicate_negatives
        if wants_ids and not get_spec(self.dataset).class_captions:
            flag = "hard_negatives" if self.hard_negatives else "skip_duplicate_negatives"
            raise ValueError(
                f"{field_name(self, flag)} needs a data set with caption ids: use --dataset shapes"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dual encoder: image tower, projection head, text tower, temperature, bias."""

    # A tiny GroupNorm ResNet by default: 4/8/16 channels, 16 features. Its random
    # features are poor on the digits (about 50 % linear probe), so what training adds is
    # visible; use --width 16 or more for CIFAR/STL.
    encoder: str = setting("resnet", "image encoder", flag="model", choices=IMAGE_ENCODERS)
    width: int | None = setting(
        4,
        "encoder width (resnet: channels of the first stage; mlp/vit: hidden width); none: "
        "the encoder's default",
        at_least=1,
    )
    depth: int | None = setting(
        None, "encoder depth (resnet: blocks per stage; mlp/vit: layers); none: default", at_least=1
    )
    embed_dim: int = setting(64, "embedding width D", at_least=1)
    head_hidden: int | None = setting(
        256, "hidden width of the projection head; none: a linear head", at_least=1
    )
    dropout: float = setting(0.0, "dropout rate in the encoders", at_least=0)
    vocab_size: int | None = setting(
        None, "text vocabulary (image-text data); none: the data set's", at_least=4
    )
    text_len: int | None = setting(
        None, "caption length in tokens (image-text data); none: the data set's", at_least=2
    )
    text_tower: str = setting(
        "transformer",
        "text tower: a transformer, or bag-of-words (mean of token embeddings, then an MLP: "
        "cheap, what keeps a locked-tower step close to the loss's own cost)",
        choices=TEXT_TOWERS,
    )
    locked_image: str | None = setting(
        None,
        "lock the image tower (LiT/SigLiT): 'pretrained' pre-trains an MLP tower on shapes' "
        "five attributes once and trains on its features; or a directory with your own "
        "features train.npy and test.npy ([N, F] float32, in the data set's example order); "
        "none: train the image tower",
        path=True,
    )
    temperature: float | None = setting(
        None, "initial temperature; none: the loss's default", positive=True
    )
    learn_temperature: bool = setting(True, "learn the temperature (CLIP/SigLIP)")
    max_inverse_temperature: float | None = setting(
        None,
        "a ceiling on the learned 1/temperature (CLIP uses 100): set it when the temperature "
        "keeps falling and the loss turns unstable or non-finite; none: no ceiling",
        positive=True,
    )
    bias: float | None = setting(
        None, "initial bias of the sigmoid loss; none: the loss's default (SigLIP: -10)"
    )

    def __post_init__(self):
        check_fields(self)
        if self.bias is not None and not math.isfinite(self.bias):
            raise ValueError(f"{field_name(self, 'bias')} must be a finite number, got {self.bias}")
        if self.dropout >= 1:
            raise ValueError(f"{field_name(self, 'dropout')} must be below 1, got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how big, where, and the bookkeeping of a run."""

    workdir: str = setting(
        "",
        "directory for checkpoints and metrics.jsonl; an existing run there is resumed",
        changes_run=False,
        path=True,
    )
    batch_size: int = setting(
        256, "global batch of pairs; a multiple of the device count", at_least=2
    )
    seed: int = setting(0, "seed of the initialisation, data order and augmentations", at_least=0)
    num_devices: int | None = setting(None, "use the first N devices; none: all", at_least=1)
    checkpoint_every: int = setting(
        100, "save a checkpoint every K steps (and after the last)", at_least=1, changes_run=False
    )
    keep_checkpoints: int = setting(3, "keep the last K checkpoints", at_least=1, changes_run=False)
    log_every: int = setting(
        10, "write a metrics.jsonl record every K steps", at_least=1, changes_run=False
    )
    eval_every: int = setting(
        0, "evaluate every K steps (0: after the last step only)", at_least=0, changes_run=False
    )
    eval_growth: float = setting(
        0.0,
        "also evaluate at the steps ceil(g^k), k = 0, 1, ... (g = 1.05: every 5 %% of the "
        "run so far; what steps to a target need); 0: off",
        at_least=0,
        changes_run=False,
    )
    stop_at: str | None = setting(
        None,
        "stop (with a checkpoint) at the first evaluation where METRIC reaches VALUE, given as "
        "METRIC=VALUE, e.g. val_zero_shot_top1=0.3 (reached at or above it; a cross-entropy, "
        "val_zero_shot_xent=4.5, at or below it); none: run every step",
    )
    noise_scale_every: int = setting(
        0,
        "measure the gradient noise scale every K steps with the fixed-batch estimator "
        "(McCandlish et al. 2018, App. A): the gradients (before clipping) of --noise-batches "
        "m batches of the run's batch size B at the step's parameters give their variance V, "
        "|G|^2 = |mean|^2 - V/m and B_simple = B V / |G|^2 (metrics noise_variance, noise_g2, "
        "noise_trace = B V, noise_b_simple); costs m extra gradient computations per "
        "measurement (m/K extra per step on average); with --adaptive-batch the estimate "
        "also decides when the batch grows; 0: off",
        at_least=0,
        changes_run=False,
    )
    noise_batches: int = setting(
        32,
        "batches m per noise-scale measurement (at least 2; 32 or more: V within about 25 %%)",
        at_least=2,
        changes_run=False,
    )
    adaptive_batch: bool = setting(
        False,
        "grow the global batch while the run trains: after a --noise-scale-every measurement "
        "whose B_simple is at least --adaptive-factor f times the batch B, B becomes B 2^k "
        "(the largest k >= 1 with B 2^k <= min(--max-batch-size, B_simple / f)), from the "
        "first step where the examples trained on are a multiple of the new batch (the data "
        "order stays the same), and the learning rate follows --adaptive-lr; resumes exactly "
        "across a change",
    )
    max_batch_size: int | None = setting(
        None,
        "adaptive batch: the largest global batch, --batch-size times a power of 2 (at most "
        "the training examples)",
        at_least=2,
    )
    adaptive_factor: float = setting(
        1.0,
        "adaptive batch: grow when the measured B_simple >= f times the batch. McCandlish et "
        "al. 2018 predict the critical batch B_crit ~ B_simple (f = 1); our study measured "
        "B_simple 5-10x below the fitted B_crit for InfoNCE and DCL, so f below 1 (e.g. 0.2) "
        "grows earlier",
        positive=True,
    )
    adaptive_lr: str = setting(
        "sqrt",
        "adaptive batch: the peak learning rate on a growth B -> B': sqrt multiplies it by "
        "sqrt(B'/B) (the study's tuned rates follow 4e-3 sqrt(B/256) within a factor 2 up to "
        "B = 1024), linear by B'/B, constant keeps it",
        choices=("sqrt", "linear", "constant"),
    )
    feature_cache: str | None = setting(
        None,
        "where a locked image tower's parameters and features are cached; none: <workdir>/features",
        changes_run=False,
        path=True,
    )
    stop_after: int | None = setting(
        None, "stop after this step as if killed (for resume tests)", at_least=1, changes_run=False
    )
    progress: bool = setting(True, "show a progress bar", changes_run=False)
    tensorboard: bool = setting(
        True,
        "also write TensorBoard event files to <workdir>/tensorboard (process 0; tensorboardX)",
        changes_run=False,
    )

    def __post_init__(self):
        check_fields(self)
        if 0 < self.eval_growth <= 1:
            raise ValueError(
                f"{field_name(self, 'eval_growth')} must be above 1 (1.05: 5 % apart) or 0 "
                f"(off), got {self.eval_growth}"
            )
        if 1 < self.eval_growth < 1.0001:  # loop.MIN_EVAL_GROWTH; 1 + 2e-16 never schedules
            raise ValueError(
                f"{field_name(self, 'eval_growth')} must be above 1 by at least 0.0001 (nearer "
                f"to 1 is every step up to 10,000: use --eval-every 1), got {self.eval_growth!r}"
            )
        try:
            parse_stop_at(self.stop_at)
        except ValueError as e:
            raise ValueError(str(e).replace("--stop-at", field_name(self, "stop_at"))) from None


@dataclasses.dataclass(frozen=True)
class HostsConfig:
    """Several processes (hosts) on one global mesh: ``jax.distributed.initialize``.

    Any of the first three set (or ``--distributed``) starts the multi-process runtime; a
    flag given overrides what JAX would detect from the cluster's environment.
    """

    distributed: bool = setting(
        False,
        "start jax.distributed even without the flags below (JAX detects the cluster)",
        changes_run=False,
    )
    coordinator_address: str | None = setting(
        None, "HOST:PORT of process 0's coordinator (multi-host)", changes_run=False
    )
    num_processes: int | None = setting(
        None, "number of processes (multi-host)", at_least=1, changes_run=False
    )
    process_id: int | None = setting(
        None, "this process's index, 0 .. N-1 (multi-host)", at_least=0, changes_run=False
    )
    peer_timeout: float = setting(
        300.0,
        "seconds without progress (start-up, a step, a save) after which a multi-host "
        "process ends with an error: a missing or dead peer never hangs the run",
        positive=True,
        changes_run=False,
    )

    def __post_init__(self):
        check_fields(self)
        if self.coordinator_address is not None:
            host, sep, port = self.coordinator_address.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"{field_name(self, 'coordinator_address')} {self.coordinator_address!r}: "
                    "give HOST:PORT, e.g. 10.0.0.1:8476"
                )
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            raise ValueError(
                f"{field_name(self, 'process_id')} {self.process_id} must be below "
                f"{field_name(self, 'num_processes')} {self.num_processes}"
            )

    @property
    def enabled(self) -> bool:
        flags = (self.coordinator_address, self.num_processes, self.process_id)
        return self.distributed or any(v is not None for v in flags)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run, as one tree."""

    data: DataConfig = setting(default_factory=DataConfig)
    model: ModelConfig = setting(default_factory=ModelConfig)
    train: TrainConfig = setting(default_factory=TrainConfig)
    run: RunConfig = setting(default_factory=RunConfig)
    hosts: HostsConfig = setting(default_factory=HostsConfig)

    def __post_init__(self):
        check_config(self)

    @property
    def steps(self) -> int:
        """The run's length in optimiser steps (the schedule's too)."""
        return self.train.optim.total_steps

    @property
    def init_temperature(self) -> float:
        t = self.model.temperature
        return self.train.loss.spec.temperature if t is None else t

    @property
    def init_bias(self) -> float | None:
        """The loss's initial bias (the sigmoid loss); None for a loss without one."""
        spec = self.train.loss.spec
        if not spec.has_bias:
            return None
        return spec.bias if self.model.bias is None else self.model.bias

    def identity(self) -> dict[str, Any]:
        """``{flag: value}`` of every setting that changes the computation.

        A resumed run must agree with its checkpoints on all of these; the others
        (logging, progress, paths, evaluation, ``--stop-after``) may change freely.
        """
        later = GLOBAL_SETTINGS | ADAPTIVE_SETTINGS
        identity = {
            flag_of(f): value
            for f, value, _ in walk(self)
            if f.metadata.get("changes_run", True) and not (f.name in later and value == f.default)
        }
        if self.run.adaptive_batch:  # the measurements decide when the batch grows
            identity["--noise-scale-every"] = self.run.noise_scale_every
            identity["--noise-batches"] = self.run.noise_batches
        return identity

    def with_updates(self, **flags: Any) -> Config:
        """A copy with some settings changed, by flag name (``learning_rate=1e-3``)."""
        values = tree_values(self)
        unknown = set(flags) - set(values)
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update(flags)
        return build_tree(Config, values)

    def check_devices(self, num_devices: int) -> None:
        """The checks that need the device count: the batch and the chunk split over it."""
        b = self.run.batch_size
        if b % num_devices:
            raise ConfigError(
                f"--batch-size {b} is not divisible by the {num_devices} devices: use a multiple "
                f"of {num_devices}, e.g. {max(num_devices, b - b % num_devices)}"
            )
        try:
            local_chunk_size(self.train.chunk_size, num_devices)
        except ValueError as e:
            raise ConfigError(str(e).replace("chunk_size=", "--chunk-size ")) from None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"--flag: old -> new"`` for every setting that differs between two identities."""
    out = []
    for flag in sorted(set(old) | set(new)):
        if old.get(flag, "<unset>") != new.get(flag, "<unset>"):
            out.append(f"{flag} {old.get(flag, '<unset>')!r} -> {new.get(flag, '<unset>')!r}")
    return out


def build_parser(prog: str = "python -m experiments.train"):
    """The training CLI's flags: one per setting of :class:`Config`."""
    return flag_parser(
        Config(),
        prog=prog,
        description="Train a contrastive dual encoder (SimCLR / CLIP / SigLIP style).",
        required=("--workdir",),
    )


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Flags -> a checked :class:`Config`; :class:`ConfigError` (one line) if bad."""
    return build_tree(Config, vars(build_parser().parse_args(argv)))
