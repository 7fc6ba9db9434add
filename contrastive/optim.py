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

from contrastive.settings import check_fields, field_name, setting

__all__ = ["OPTIMIZERS", "OptimConfig", "make_schedule", "make_optimizer", "decay_mask"]

OPTIMIZERS = ("adamw", "lamb", "lars")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings (each field's help is in its metadata)."""

    name: str = setting("adamw", "optimiser", flag="optimizer", choices=OPTIMIZERS)
    learning_rate: float = setting(
        1e-3, "peak learning rate (linear warm-up, then cosine decay)", positive=True
    )
    warmup_steps: int = setting(0, "linear warm-up steps from 0", at_least=0)
    total_steps: int = setting(
        1000, "length of the schedule, warm-up included", at_least=1, cli=False
    )
    end_lr_ratio: float = setting(0.0, "final learning rate as a fraction of the peak", at_least=0)
    weight_decay: float = setting(1e-4, "decoupled weight decay on weight matrices", at_least=0)
    b1: float = setting(0.9, "Adam/LAMB first-moment decay", at_least=0)
    b2: float = setting(0.999, "Adam/LAMB second-moment decay", at_least=0)
    eps: float = setting(1e-8, "Adam/LAMB epsilon", positive=True)
    momentum: float = setting(0.9, "LARS momentum", at_least=0)
    trust_coefficient: float = setting(1e-3, "LARS trust coefficient", positive=True)
    clip_norm: float | None = setting(
        1.0, "clip the global gradient norm to this value first; none: no clipping", positive=True
    )

    def __post_init__(self):
        check_fields(self)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"{field_name(self, 'warmup_steps')} ({self.warmup_steps}) must not exceed the "
                f"schedule's {self.total_steps} steps: lower it"
            )


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``end_lr_ratio * lr``.

    A schedule that is all warm-up (``warmup_steps == total_steps``) ends at the peak.
    """
    if cfg.warmup_steps >= cfg.total_steps:
        return optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
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
