"""Optimisers from a config: AdamW, LAMB or LARS (optax), warm-up + cosine, gradient clipping.

Weight decay (and the LARS trust ratio) applies to weight matrices and kernels only
(rank >= 2): biases, normalisation scales, the temperature and the sigmoid bias are left
alone, as in CLIP, SimCLR and SigLIP.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from contrastive.step_configs import OptimConfig

__all__ = ["make_schedule", "make_optimizer", "decay_mask"]


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``end_lr_ratio * lr``.

    A schedule that is all warm-up (``warmup == total_steps``) ends at the peak.
    """
    if cfg.warmup >= cfg.total_steps:
        return optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup,
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
