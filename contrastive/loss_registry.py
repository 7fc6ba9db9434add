"""The one registry of losses: name -> function, default temperature and bias, options.

Every part of the training system that needs to know the losses (the config's choices, the
train step's dispatch, the model's initial temperature and bias, the sweeps' labels, the
benchmarks) reads :data:`LOSSES`. The defaults are read once, here, from the loss functions'
own signatures in :mod:`losses`, where they are stated.

>>> LOSSES["sigmoid"].temperature, LOSSES["sigmoid"].bias, LOSSES["infonce"].bias
(0.1, -10.0, None)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax

import losses

__all__ = ["LossSpec", "LOSSES", "LOSS_NAMES", "STATEFUL_LOSSES", "TRAIN_LOSS_NAMES", "loss_spec"]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: its function and what the training system must know about it."""

    name: str
    fn: Callable[..., jax.Array]
    label: str  # for tables and plots
    options: tuple[str, ...]  # the keyword options of ``fn`` the train step passes on

    def _default(self, argument: str) -> Any:
        p = inspect.signature(self.fn).parameters.get(argument)
        return None if p is None else p.default

    @property
    def temperature(self) -> float:
        """The loss's own default temperature (CLIP 0.07; SigLIP and DCL 0.1)."""
        return self._default("temperature")

    @property
    def bias(self) -> float | None:
        """The default of a learnable bias (SigLIP: -10); None for a loss without one."""
        return self._default("bias")

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def __call__(self, x: jax.Array, y: jax.Array, **kwargs: Any) -> jax.Array:
        return self.fn(x, y, **kwargs)


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("infonce", losses.infonce, "InfoNCE", ("symmetric", "intra_view")),
        LossSpec("sigmoid", losses.sigmoid, "sigmoid (SigLIP)", ()),
        LossSpec(
            "decoupled", losses.decoupled, "decoupled (DCL)", ("sigma", "symmetric", "intra_view")
        ),
    )
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)

# Losses with per-example state (the train step keeps it: contrastive.step.example_states). Kept
# apart from LOSSES, whose entries are plain functions of a batch that sweeps and benchmarks
# iterate over; the training CLI takes both (TRAIN_LOSS_NAMES).
STATEFUL_LOSSES: dict[str, LossSpec] = {
    "global-infonce": LossSpec(
        "global-infonce",
        losses.global_infonce,
        "global InfoNCE (SogCLR)",
        ("symmetric", "intra_view", "gamma", "rho", "individual_temperature"),
    )
}
TRAIN_LOSS_NAMES: tuple[str, ...] = LOSS_NAMES + tuple(STATEFUL_LOSSES)


def loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name``; a one-line ValueError naming the choices if unknown."""
    if name in STATEFUL_LOSSES:
        return STATEFUL_LOSSES[name]
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(TRAIN_LOSS_NAMES)}")
    return LOSSES[name]
