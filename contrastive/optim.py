"""Optimisers from a config: AdamW, LAMB or LARS (optax), warm-up + cosine, gradient clipping.

Weight decay (and the LARS trust ratio) applies to weight matrices and kernels only
(rank >= 2): biases, normalisation scales, the temperature and the sigmoid bias are left
alone, as in CLIP, SimCLR and SigLIP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

__all__ = ["OptimConfig", "make_schedule", "make_optimizer", "decay_mask"]

OPTIMIZERS = ("adamw", "lamb", "lars")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings.

    Attributes:
      name: "adamw", "lamb" or "lars".
      learning_rate: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warm-up from 0.
      total_steps: length of the schedule (warm-up included); cosine decay after warm-up.
      end_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay on rank >= 2 parameters.
      b1, b2, eps: Adam/LAMB moments.
      momentum, trust_coefficient: LARS.
      clip_norm: clip the global gradient norm to this value first; None turns it off.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.0
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}.")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}."
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}.")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``end_lr_ratio * lr``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: weight matrices and kernels (rank >= 2)."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` (clipping first, then the optimiser)."""
    lr = make_schedule(cfg)
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    elif cfg.name == "lamb":
        opt = optax.lamb(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    else:
        opt = optax.lars(
            lr,
            weight_decay=cfg.weight_decay,
            weight_decay_mask=decay_mask,
            trust_coefficient=cfg.trust_coefficient,
            trust_ratio_mask=decay_mask,
            momentum=cfg.momentum,
        )
    if cfg.clip_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
