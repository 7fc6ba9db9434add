"""Configuration of a training run: one tree of dataclasses, its flags, its checks.

``Config`` nests the library's own settings (``TrainConfig`` with its ``LossConfig`` and
``OptimConfig``) beside the data, model and run settings defined here. Every field is
made with :func:`contrastive.settings.setting`, which holds its help, flag and allowed
values once; :func:`build_parser` generates the flags from the tree and
:func:`parse_config` builds the tree back from them, so each check runs exactly once, when
its dataclass is built, and a bad flag fails in a second with one line naming the flag.

Kept apart from the entry point (flax-examples style): ``experiments/train.py`` is a thin
main that parses these flags and calls :func:`experiments.train.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from contrastive.data.pipeline import DATASETS
from contrastive.models import IMAGE_ENCODERS, SIGLIP_INIT_BIAS
from contrastive.optim import OptimConfig
from contrastive.settings import check_fields, field_name, flag_of, naming, setting
from contrastive.train_step import (
    TrainConfig,
    default_temperature,
    local_chunk_size,
)


class ConfigError(ValueError):
    """A bad configuration; the message is one line that says what to change."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data set, where it lives, how much of it evaluation reads."""

    dataset: str = setting(
        "digits", "data set (digits: offline, from scikit-learn)", choices=tuple(DATASETS)
    )
    data_dir: str | None = setting(
        None, "TFDS data dir; none: ~/tensorflow_datasets", changes_run=False
    )
    image_size: int | None = setting(
        None, "side of the square model input; none: the data set's", at_least=4
    )
    eval_examples: int = setting(
        10000, "at most this many examples per split for evaluation", at_least=1, changes_run=False
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

    def __post_init__(self):
        check_fields(self)
        wants_ids = self.hard_negatives or self.skip_duplicate_negatives
        if wants_ids and not DATASETS[self.dataset].class_captions:
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
    temperature: float | None = setting(
        None, "initial temperature; none: the loss's default", positive=True
    )
    learn_temperature: bool = setting(True, "learn the temperature (CLIP/SigLIP)")
    bias: float | None = setting(
        None, "initial bias of the sigmoid loss; none: the loss's default (SigLIP: -10)"
    )

    def __post_init__(self):
        check_fields(self)
        if self.dropout >= 1:
            raise ValueError(f"{field_name(self, 'dropout')} must be below 1, got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how big, where, and the bookkeeping of a run."""

    workdir: str = setting(
        "",
        "directory for checkpoints and metrics.jsonl; an existing run there is resumed",
        changes_run=False,
    )
    steps: int = setting(300, "training steps", at_least=1)
    batch_size: int = setting(
        256, "global batch of pairs; a multiple of the device count", at_least=2
    )
    seed: int = setting(0, "seed of the initialisation, data order and augmentations")
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
    stop_after: int | None = setting(
        None, "stop after this step as if killed (for resume tests)", at_least=1, changes_run=False
    )
    progress: bool = setting(True, "show a progress bar", changes_run=False)

    def __post_init__(self):
        check_fields(self)


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


def _default_optim() -> OptimConfig:
    return OptimConfig(learning_rate=2e-3, warmup_steps=20, total_steps=RunConfig().steps)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run, as one tree."""

    data: DataConfig = setting(default_factory=DataConfig)
    model: ModelConfig = setting(default_factory=ModelConfig)
    train: TrainConfig = setting(default_factory=lambda: TrainConfig(optim=_default_optim()))
    run: RunConfig = setting(default_factory=RunConfig)
    hosts: HostsConfig = setting(default_factory=HostsConfig)

    def __post_init__(self):
        r, t = self.run, self.train
        if t.optim.total_steps != r.steps:
            raise ValueError(
                f"the schedule's total_steps ({t.optim.total_steps}) must equal "
                f"{field_name(r, 'steps')} ({r.steps})"
            )
        if t.chunk_size is not None and t.chunk_size > r.batch_size:
            raise ValueError(
                f"{field_name(t, 'chunk_size')} {t.chunk_size} is larger than "
                f"{field_name(r, 'batch_size')} {r.batch_size}: use a chunk size <= the batch "
                "size, or drop it"
            )
        if r.stop_after is not None and r.stop_after > r.steps:
            raise ValueError(
                f"{field_name(r, 'stop_after')} must be between 1 and "
                f"{field_name(r, 'steps')}={r.steps}"
            )
        if DATASETS[self.data.dataset].kind == "image_text" and t.loss.intra_view:
            raise ValueError(
                f"{field_name(t.loss, 'intra_view')} needs two views of one image, not "
                "image-text pairs"
            )

    @property
    def init_temperature(self) -> float:
        t = self.model.temperature
        return default_temperature(self.train.loss.name) if t is None else t

    @property
    def init_bias(self) -> float | None:
        """The sigmoid loss's initial bias; None for the softmax losses (no bias)."""
        if self.train.loss.name != "sigmoid":
            return None
        return SIGLIP_INIT_BIAS if self.model.bias is None else self.model.bias

    def identity(self) -> dict[str, Any]:
        """``{flag: value}`` of every setting that changes the computation.

        A resumed run must agree with its checkpoints on all of these; the others
        (logging, progress, paths, evaluation, ``--stop-after``) may change freely.
        """
        return {
            flag_of(f): value for f, value, _ in _walk(self) if f.metadata.get("changes_run", True)
        }

    def with_updates(self, **flags: Any) -> Config:
        """A copy with some settings changed, by flag name (``learning_rate=1e-3``)."""
        values = {flag_of(f)[2:].replace("-", "_"): v for f, v, _ in _walk(self)}
        unknown = set(flags) - set(values)
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update(flags)
        return _build(Config, values)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"--flag: old -> new"`` for every setting that differs between two identities."""
    out = []
    for flag in sorted(set(old) | set(new)):
        if old.get(flag, "<unset>") != new.get(flag, "<unset>"):
            out.append(f"{flag} {old.get(flag, '<unset>')!r} -> {new.get(flag, '<unset>')!r}")
    return out


# ------------------------------------------------------------------ the tree <-> flags


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _walk(obj: Any) -> Iterator[tuple[dataclasses.Field, Any, Any]]:
    """Every leaf setting of a config tree: ``(field, value, type)``, in order."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_config(hints[f.name]):
            yield from _walk(value)
        elif f.metadata.get("cli", True):
            yield f, value, hints[f.name]


def _flag_name(obj: Any, name: str) -> str:
    for f in dataclasses.fields(obj):
        if f.name == name:
            return flag_of(f)
    return name


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Build the tree of ``cls`` from flat ``{dest: value}`` (argparse's names)."""
    with naming(_flag_name):
        try:
            return _build_node(cls, values, steps=values.get("steps"))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def _build_node(cls: type, values: dict[str, Any], steps: int | None) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            kwargs[f.name] = _build_node(hints[f.name], values, steps)
        elif not f.metadata.get("cli", True):
            if cls is OptimConfig and f.name == "total_steps" and steps is not None:
                kwargs[f.name] = steps  # the schedule runs for the whole run
        else:
            dest = flag_of(f)[2:].replace("-", "_")
            if dest in values:
                kwargs[f.name] = values[dest]
    return cls(**kwargs)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _optional(kind: type):
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _argument_type(tp: Any):
    """The argparse ``type`` for a field annotation: int, float, str, or ``X | None``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return _optional(inner)
    return tp


def build_parser(
    defaults: Config | None = None, *, prog: str = "python -m experiments.train"
) -> argparse.ArgumentParser:
    """Flags for every setting of :class:`Config`, help from the fields (choices are
    checked when the tree is built, so that the error names the flag in one line)."""
    p = _OneLineParser(
        prog=prog,
        description="Train a contrastive dual encoder (SimCLR / CLIP / SigLIP style).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config() if defaults is None else defaults
    for f, value, tp in _walk(defaults):
        flag = flag_of(f)
        help_text = f.metadata.get("help") or " "
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" ({', '.join(map(str, choices))})"
        if tp is bool:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=value, help=help_text
            )
        else:
            p.add_argument(
                flag,
                type=_argument_type(tp),
                default=value,
                required=flag == "--workdir",
                help=help_text,
            )
    return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Flags -> a checked :class:`Config`; :class:`ConfigError` (one line) if bad."""
    args = build_parser().parse_args(argv)
    return _build(Config, vars(args))


def check_devices(cfg: Config, num_devices: int) -> None:
    """The checks that need the device count: the batch and the chunk split over it."""
    b = cfg.run.batch_size
    if b % num_devices:
        raise ConfigError(
            f"--batch-size {b} is not divisible by the {num_devices} devices: use a multiple of "
            f"{num_devices}, e.g. {max(num_devices, b - b % num_devices)}"
        )
    try:
        local_chunk_size(cfg.train.chunk_size, num_devices)
    except ValueError as e:
        raise ConfigError(str(e).replace("chunk_size=", "--chunk-size ")) from None
