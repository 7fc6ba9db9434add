"""The train step's part of a run's config: the loss, the optimiser, the step itself.

:class:`TrainConfig` holds :class:`LossConfig` and :class:`OptimConfig` and the gradient
cache, streaming and sharding settings of the step; it is ``Config.train`` of
:class:`contrastive.configs.Config` (which re-exports these names). What the step reads of a
run lives here, so that :mod:`contrastive.step` needs nothing of the rest of the tree.
"""

from __future__ import annotations

import dataclasses

from contrastive.loss_registry import STATEFUL_LOSSES, TRAIN_LOSS_NAMES, loss_spec
from contrastive.settings import (
    check_fields,
    field_name,
    setting,
)

OPTIMIZERS = ("adamw", "lamb", "lars")
DEFAULT_WARMUP_STEPS = 20  # capped at the run's length: a short run needs no flag
# The global loss's settings, added after runs were checkpointed: at their defaults they are
# left out of a run's identity, so that those runs still resume.
GLOBAL_SETTINGS = frozenset(
    ("gamma", "rho", "individual_temperature", "temperature_lr", "min_temperature",
     "max_temperature")
)  # fmt: skip
DEFAULT_GAMMA = 0.9  # SogCLR's γ (Yuan et al. 2022)


# ------------------------------------------------------------------ the train step


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss and its options (see ``losses``)."""

    name: str = setting(
        "infonce",
        "infonce (CLIP; NT-Xent with --intra-view), sigmoid (SigLIP), decoupled (DCL/DCLW) or "
        "global-infonce (SogCLR: per-example moving averages; iSogCLR with "
        "--individual-temperature)",
        flag="loss",
        choices=TRAIN_LOSS_NAMES,
    )
    symmetric: bool = setting(True, "average both directions of the softmax losses")
    intra_view: bool = setting(
        False, "same-view negatives in the softmax losses (SimCLR's NT-Xent)"
    )
    sigma: float | None = setting(
        None, "DCLW weighting of the decoupled loss; none: plain DCL", positive=True
    )
    block_size: int | None = setting(
        None, "similarity tile edge of the tiled losses; none: automatic", at_least=1
    )
    # The global loss (contrastive.step.example_states); see GLOBAL_SETTINGS.
    gamma: float | None = setting(
        None,
        "global-infonce: rate of each example's moving average u <- (1 - g) u + g g_batch, in "
        "(0, 1]; none: 0.9",
        positive=True,
    )
    rho: float = setting(0.0, "global-infonce: iSogCLR's DRO radius (adds rho tau_i)", at_least=0)
    individual_temperature: bool = setting(
        False,
        "global-infonce: learn a temperature per example and direction (iSogCLR), by projected "
        "SGD with --temperature-lr within [--min-temperature, --max-temperature]",
    )
    temperature_lr: float = setting(
        1e-3, "learning rate of the individual temperatures", positive=True
    )
    min_temperature: float = setting(
        0.01, "lower bound of the individual temperatures", positive=True
    )
    max_temperature: float = setting(
        1.0, "upper bound of the individual temperatures", positive=True
    )

    def __post_init__(self):
        check_fields(self)
        spec = loss_spec(self.name)
        for option in ("sigma", "intra_view", "gamma", "rho", "individual_temperature"):
            value = getattr(self, option)
            if value and option not in spec.options:
                owners = [n for n in TRAIN_LOSS_NAMES if option in loss_spec(n).options]
                what = (
                    f"is an option of the {owners[0]} loss"
                    if len(owners) == 1
                    else "is for the softmax losses"
                )
                shown = f" {value!r}" if option in ("sigma", "gamma", "rho") else ""
                raise ValueError(
                    f"{field_name(self, option)}{shown} {what}: drop it or set "
                    f"{field_name(self, 'name')} {owners[0]}"
                )
        if self.gamma is not None and self.gamma > 1:
            raise ValueError(f"{field_name(self, 'gamma')} must be in (0, 1], got {self.gamma}")
        if self.min_temperature > self.max_temperature:
            raise ValueError(
                f"{field_name(self, 'min_temperature')} {self.min_temperature} is above "
                f"{field_name(self, 'max_temperature')} {self.max_temperature}"
            )
        if self.individual_temperature and self.intra_view:
            raise ValueError(
                f"{field_name(self, 'individual_temperature')} does not combine with "
                f"{field_name(self, 'intra_view')} (a same-view logit would need two "
                "temperatures): drop one"
            )

    @property
    def spec(self):
        """The loss's :class:`~contrastive.loss_registry.LossSpec`."""
        return loss_spec(self.name)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its schedule: linear warm-up, then cosine decay over the run."""

    name: str = setting("adamw", "optimiser", flag="optimizer", choices=OPTIMIZERS)
    learning_rate: float = setting(
        2e-3, "peak learning rate (linear warm-up, then cosine decay)", positive=True
    )
    total_steps: int = setting(
        300, "training steps (the schedule runs over all of them)", flag="steps", at_least=1
    )
    warmup_steps: int | None = setting(
        None,
        f"linear warm-up steps from 0; none: {DEFAULT_WARMUP_STEPS}, or the whole run if it "
        "is shorter",
        at_least=0,
    )
    end_lr_ratio: float = setting(0.0, "final learning rate as a fraction of the peak", at_least=0)
    weight_decay: float = setting(1e-4, "decoupled weight decay on weight matrices", at_least=0)
    b1: float = setting(0.9, "Adam/LAMB first-moment decay, in [0, 1)", at_least=0)
    b2: float = setting(0.999, "Adam/LAMB second-moment decay, in [0, 1)", at_least=0)
    eps: float = setting(1e-8, "Adam/LAMB epsilon", positive=True)
    momentum: float = setting(0.9, "LARS momentum, in [0, 1)", at_least=0)
    trust_coefficient: float = setting(1e-3, "LARS trust coefficient", positive=True)
    clip_norm: float | None = setting(
        1.0, "clip the global gradient norm to this value first; none: no clipping", positive=True
    )

    def __post_init__(self):
        check_fields(self)
        for name in ("b1", "b2", "momentum"):
            if not getattr(self, name) < 1:
                raise ValueError(
                    f"{field_name(self, name)} must be in [0, 1), got {getattr(self, name)}"
                )
        if self.end_lr_ratio > 1:
            raise ValueError(
                f"{field_name(self, 'end_lr_ratio')} must be in [0, 1] (a fraction of the peak), "
                f"got {self.end_lr_ratio}"
            )
        if self.warmup_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(
                f"{field_name(self, 'warmup_steps')} ({self.warmup_steps}) must not exceed the "
                f"run's {field_name(self, 'total_steps')} {self.total_steps}: lower it"
            )

    @property
    def warmup(self) -> int:
        """The warm-up steps in force (the default rule applied)."""
        if self.warmup_steps is None:
            return min(DEFAULT_WARMUP_STEPS, self.total_steps)
        return self.warmup_steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train step settings: loss, optimiser, gradient-cache chunk, optimiser sharding."""

    loss: LossConfig = setting(default_factory=LossConfig)
    optim: OptimConfig = setting(default_factory=OptimConfig)
    chunk_size: int | None = setting(
        None,
        "gradient caching: encode the global batch in chunks of this many rows (a multiple "
        "of the device count; each device encodes chunk/devices rows at a time); none: "
        "encode the whole batch at once",
        at_least=1,
    )
    shard_optimizer: bool = setting(
        False,
        "shard the optimiser state (and reduce-scatter the gradients) along the data axis "
        "(ZeRO-1/2); parameters stay replicated",
    )
    negative_queue: int = setting(
        0,
        "keep the second tower's embeddings of the last K steps in a queue on the devices and "
        "give them to the loss as extra negatives (MoCo's queue without the momentum "
        "encoder; no gradient flows into them); 0: off",
        at_least=0,
    )
    stream: bool = setting(
        False,
        "streamed gradient cache: read each chunk of raw inputs from the data set twice "
        "(embed, then re-encode under vjp) instead of holding the step's whole batch; use it "
        "when the raw batch does not fit in host or device memory (needs --chunk-size; the "
        "in-memory step is faster when it fits)",
    )

    def __post_init__(self):
        check_fields(self)
        if self.stream and self.chunk_size is None:
            raise ValueError(
                f"{field_name(self, 'stream')} reads the batch chunk by chunk: set "
                f"{field_name(self, 'chunk_size')} too"
            )
        if self.stream and self.negative_queue:
            raise ValueError(
                f"{field_name(self, 'stream')} does not combine with "
                f"{field_name(self, 'negative_queue')} yet: drop one"
            )
        if self.negative_queue and self.loss.name in STATEFUL_LOSSES:
            raise ValueError(
                f"{field_name(self, 'negative_queue')} does not combine with "
                f"{field_name(self.loss, 'name')} {self.loss.name} (its moving averages are over "
                "the batch's own negatives): drop one"
            )
        if self.stream and self.loss.name in STATEFUL_LOSSES:
            raise ValueError(
                f"{field_name(self, 'stream')} does not combine with "
                f"{field_name(self.loss, 'name')} {self.loss.name} yet: drop one"
            )
        if self.negative_queue and self.loss.intra_view:
            raise ValueError(
                f"{field_name(self, 'negative_queue')} gives extra negatives of the second "
                f"view; it does not combine with {field_name(self.loss, 'intra_view')}: drop one"
            )


def local_chunk_size(chunk_size: int | None, devices: int) -> int | None:
    """Rows per chunk on each device; ValueError unless the devices split the chunk evenly."""
    if chunk_size is None:
        return None
    if chunk_size % devices:
        raise ValueError(
            f"chunk_size={chunk_size} does not split over the {devices} devices: use a multiple "
            f"of {devices} (e.g. {max(devices, chunk_size - chunk_size % devices)})."
        )
    return chunk_size // devices
