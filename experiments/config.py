"""Configuration of a training run: one dataclass, its flags, and its validation.

Kept apart from the entry point (flax-examples style): ``experiments/train.py`` is a thin
main that parses these flags and calls :func:`experiments.train.run`. ``validate`` does every
check that needs no data and no compilation, so a bad flag fails in a second with one line
that says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from contrastive.data.pipeline import DATASETS

LOSSES = ("infonce", "sigmoid", "decoupled")
MODELS = ("mlp", "resnet", "vit")
OPTIMIZERS = ("adamw", "lamb", "lars")


class ConfigError(ValueError):
    """A bad configuration; the message is one line that says what to change."""


@dataclasses.dataclass
class Config:
    """Everything that defines a run. Field names match the ``--flags`` (``_`` -> ``-``)."""

    workdir: str = ""
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None  # None: the dataset's default
    # model
    # A tiny GroupNorm ResNet: 4/8/16 channels, 16 features. Its random features are poor on
    # the digits (about 50 % linear probe), so what training adds is visible; use --width 16
    # or more for CIFAR/STL. --width is the hidden width of the MLP and ViT.
    model: str = "resnet"
    width: int | None = 4  # None: the encoder's default
    depth: int | None = None
    embed_dim: int = 64
    head_hidden: int | None = 256
    dropout: float = 0.0
    vocab_size: int = 8192  # image-text only
    text_len: int = 32
    # loss
    loss: str = "infonce"
    temperature: float | None = None  # None: 0.07 (CLIP) for softmax losses, 0.1 for sigmoid
    learn_temperature: bool = True
    bias: float = -10.0  # initial bias of the sigmoid loss (SigLIP)
    symmetric: bool = True
    intra_view: bool = False
    sigma: float | None = None
    block_size: int | None = None
    ring: bool = True
    # optimisation
    steps: int = 300
    batch_size: int = 256
    chunk_size: int | None = None
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    clip_norm: float | None = 1.0
    seed: int = 0
    num_devices: int | None = None  # None: all devices
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate after the last step only
    eval_examples: int = 10000  # cap on the examples per split used for evaluation
    stop_after: int | None = None  # stop (as if killed) after this step; for resume tests
    progress: bool = True

    def validate(self, num_devices: int | None = None) -> None:
        """Raise :class:`ConfigError` for any setting that cannot work.

        ``num_devices``: the devices the run will use, when known (divisibility checks).
        """
        if not self.workdir:
            raise ConfigError("--workdir is required: pass a directory for checkpoints/metrics")
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"unknown --dataset {self.dataset!r}: use one of {', '.join(DATASETS)}"
            )
        _one_of("--loss", self.loss, LOSSES)
        _one_of("--model", self.model, MODELS)
        _one_of("--optimizer", self.optimizer, OPTIMIZERS)
        for flag, value in [
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--checkpoint-every", self.checkpoint_every),
            ("--keep-checkpoints", self.keep_checkpoints),
            ("--log-every", self.log_every),
            ("--embed-dim", self.embed_dim),
        ]:
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"--warmup-steps must be between 0 and --steps={self.steps}, got "
                f"{self.warmup_steps}"
            )
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2: a contrastive loss needs negatives")
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ConfigError(f"--chunk-size must be at least 1, got {self.chunk_size}")
            if self.chunk_size > self.batch_size:
                raise ConfigError(
                    f"--chunk-size {self.chunk_size} is larger than --batch-size "
                    f"{self.batch_size}: use a chunk size <= the batch size, or drop --chunk-size"
                )
        if self.sigma is not None and self.loss != "decoupled":
            raise ConfigError("--sigma (DCLW) needs --loss decoupled")
        if self.intra_view and self.loss == "sigmoid":
            raise ConfigError(
                "--intra-view is for the softmax losses: drop it or use --loss infonce"
            )
        kind = DATASETS[self.dataset].kind
        if kind == "image_text" and self.intra_view:
            raise ConfigError("--intra-view needs two views of one image, not image-text pairs")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ConfigError(f"--stop-after must be between 1 and --steps={self.steps}")
        if num_devices is not None and self.batch_size % num_devices:
            raise ConfigError(
                f"--batch-size {self.batch_size} is not divisible by the {num_devices} "
                f"devices: use a multiple of {num_devices}, e.g. "
                f"{max(num_devices, self.batch_size - self.batch_size % num_devices)}"
            )

    @property
    def init_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.1 if self.loss == "sigmoid" else 0.07

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoints."""
        keep = (
            "dataset",
            "image_size",
            "model",
            "width",
            "depth",
            "embed_dim",
            "head_hidden",
            "loss",
            "batch_size",
            "optimizer",
            "seed",
            "steps",
        )
        return {k: getattr(self, k) for k in keep}


def _one_of(flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {flag} {value!r}: use one of {', '.join(choices)}")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _optional_int(s: str) -> int | None:
    return None if s.lower() == "none" else int(s)


def _optional_float(s: str) -> float | None:
    return None if s.lower() == "none" else float(s)


HELP = {
    "workdir": "directory for checkpoints and metrics.jsonl; an existing run there is resumed",
    "dataset": f"one of {', '.join(DATASETS)} (digits: offline, prepared from scikit-learn)",
    "data_dir": "TFDS data dir; None: ~/tensorflow_datasets",
    "image_size": "side of the square model input; None: the dataset's",
    "model": f"image encoder: one of {', '.join(MODELS)}",
    "width": "encoder width (resnet: channels of the first stage; mlp/vit: hidden width)",
    "loss": f"one of {', '.join(LOSSES)}",
    "temperature": "initial temperature; None: 0.07, or 0.1 for sigmoid",
    "learn_temperature": "learn the temperature (CLIP/SigLIP)",
    "depth": "encoder depth (resnet: blocks per stage; mlp/vit: layers); None: default",
    "embed_dim": "embedding width D",
    "head_hidden": "hidden width of the projection head; none: a linear head",
    "dropout": "dropout rate in the encoders",
    "vocab_size": "hashed vocabulary of the caption tokenizer (image-text)",
    "text_len": "caption length in tokens (image-text)",
    "symmetric": "average both directions of the softmax losses",
    "steps": "training steps",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "decoupled weight decay on weight matrices",
    "clip_norm": "clip the global gradient norm; none: no clipping",
    "seed": "seed of the initialisation, data order and augmentations",
    "progress": "show a progress bar",
    "bias": "initial bias of the sigmoid loss",
    "intra_view": "NT-Xent: same-view negatives in the softmax losses (SimCLR)",
    "sigma": "DCLW weighting of the decoupled loss; None: plain DCL",
    "block_size": "similarity tile edge of the tiled losses; None: automatic",
    "ring": "run the loss as a ring over the devices (shard_map)",
    "batch_size": "global batch of pairs; a multiple of the device count",
    "chunk_size": "gradient caching: encode the batch in chunks of this many rows",
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "learning_rate": "peak learning rate (linear warm-up, then cosine decay)",
    "num_devices": "use the first N devices; None: all",
    "checkpoint_every": "save a checkpoint every K steps (and after the last)",
    "keep_checkpoints": "keep the last K checkpoints",
    "log_every": "write a metrics.jsonl record every K steps",
    "eval_every": "evaluate every K steps (0: after the last step only)",
    "eval_examples": "at most this many examples per split for evaluation",
    "stop_after": "stop after this step as if killed (for resume tests)",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags for every :class:`Config` field (choices are checked in ``validate``)."""
    p = _OneLineParser(
        prog="python -m experiments.train",
        description="Train a contrastive dual encoder (SimCLR / CLIP / SigLIP style).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    types = {
        int: int,
        float: float,
        str: str,
        "int|None": _optional_int,
        "float|None": _optional_float,
        "str|None": str,
    }
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=HELP.get(f.name, " "),
            )
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type) or types[
                f.type.replace(" ", "")
            ]
            p.add_argument(
                flag,
                type=kind,
                default=default,
                required=f.name == "workdir",
                help=HELP.get(f.name, " "),
            )
    return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Flags -> :class:`Config` (not yet validated)."""
    args = build_parser().parse_args(argv)
    return Config(**vars(args))
