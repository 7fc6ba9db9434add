"""The cross-field checks of a run's config: what no single field can say about itself.

Each field checks its own value (:func:`contrastive.settings.setting`) and each group its own
fields; :func:`check_config`, run when a :class:`~contrastive.configs.Config` is made, checks
what ties the groups together (chunk against batch size, a loss's options against the data
set, ``--stop-at`` against the metrics the run measures, the temperature against its
ceiling), each refusal one line that names the flags and what to do.
"""

from __future__ import annotations

import math
from typing import Any

from contrastive.data.pipeline import get_spec, metric_names
from contrastive.loss_registry import STATEFUL_LOSSES
from contrastive.settings import field_name

__all__ = ["check_config", "parse_stop_at"]


def parse_stop_at(text: str | None) -> tuple[str, float] | None:
    """``"val_zero_shot_top1=0.3"`` -> ``("val_zero_shot_top1", 0.3)``; ValueError if bad."""
    if text is None:
        return None
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not metric.strip() or not math.isfinite(number):
        raise ValueError(
            f"--stop-at {text!r}: give METRIC=VALUE with a finite number, e.g. "
            "val_zero_shot_top1=0.3"
        )
    return metric.strip(), number


def check_config(cfg: Any) -> None:
    """Raise ValueError (one line) when the groups of ``cfg`` do not fit together."""
    r, t = cfg.run, cfg.train
    if t.chunk_size is not None and t.chunk_size > r.batch_size:
        raise ValueError(
            f"{field_name(t, 'chunk_size')} {t.chunk_size} is larger than "
            f"{field_name(r, 'batch_size')} {r.batch_size}: use a chunk size <= the batch "
            "size, or drop it"
        )
    if r.stop_after is not None and r.stop_after > cfg.steps:
        raise ValueError(
            f"{field_name(r, 'stop_after')} must be between 1 and "
            f"{field_name(t.optim, 'total_steps')}={cfg.steps}"
        )
    if get_spec(cfg.data.dataset).kind == "image_text" and t.loss.intra_view:
        raise ValueError(
            f"{field_name(t.loss, 'intra_view')} needs two views of one image, not image-text pairs"
        )
    spec = get_spec(cfg.data.dataset)
    d, m = cfg.data, cfg.model
    if d.validation_examples and not spec.class_captions:
        raise ValueError(
            f"{field_name(d, 'validation_examples')} needs a data set whose validation "
            "metric does not depend on the batch (zero-shot over its captions): use "
            "--dataset shapes"
        )
    if m.locked_image is not None and not (spec.kind == "image_text" and spec.vocab_size):
        raise ValueError(
            f"{field_name(m, 'locked_image')} needs an image-text data set with its own "
            "caption tokens: use --dataset shapes"
        )
    target = parse_stop_at(r.stop_at)
    if target is not None:
        known = metric_names(spec, validation=bool(d.validation_examples))
        if target[0] not in known and target[0] in metric_names(spec, validation=True):
            raise ValueError(
                f"{field_name(r, 'stop_at')}: {target[0]!r} is measured on a validation "
                f"split, and this run has none: add {field_name(d, 'validation_examples')} "
                "V (examples carved from the training split after --train-examples)"
            )
        if target[0] not in known:
            raise ValueError(
                f"{field_name(r, 'stop_at')}: unknown metric {target[0]!r} for "
                f"{d.dataset}: use one of {', '.join(known)}"
            )
    if d.hard_batches:
        c = d.cluster_size
        if c > r.batch_size or r.batch_size % c:
            raise ValueError(
                f"{field_name(d, 'cluster_size')} {c} must divide "
                f"{field_name(r, 'batch_size')} {r.batch_size} (each batch is whole "
                "clusters): use a divisor of the batch size"
            )
    if t.loss.name in STATEFUL_LOSSES:
        for flag in ("hard_negatives", "skip_duplicate_negatives", "hard_batches"):
            if getattr(d, flag):
                raise ValueError(
                    f"{field_name(d, flag)} does not combine with {field_name(t.loss, 'name')} "
                    f"{t.loss.name} yet (it needs each batch row's example id): drop it"
                )
    if t.stream and (d.hard_negatives or d.hard_batches):
        flag = "hard_negatives" if d.hard_negatives else "hard_batches"
        raise ValueError(
            f"{field_name(t, 'stream')} does not combine with {field_name(d, flag)} yet: drop one"
        )
    _check_adaptive(cfg)
    _check_global_temperature(cfg)
    tau, ceiling = cfg.init_temperature, m.max_inverse_temperature
    if ceiling is not None and 1 / tau > ceiling * (1 + 1e-9):
        # The clip would hold the temperature at 1/ceiling from the first step on.
        given = (
            f"{field_name(m, 'temperature')} {tau:g}"
            if m.temperature is not None
            else f"the {t.loss.name} loss's default temperature {tau:g}"
        )
        raise ValueError(
            f"{given} is below 1/{field_name(m, 'max_inverse_temperature')} = "
            f"{1 / ceiling:g}, so the run would train at {1 / ceiling:g}: raise "
            f"--max-inverse-temperature to at least {1 / tau:g}, or raise --temperature"
        )
    if cfg.model.bias is not None and not t.loss.spec.has_bias:
        raise ValueError(
            f"{field_name(cfg.model, 'bias')} is for a loss with a bias (sigmoid), not "
            f"{t.loss.name}: drop it or set {field_name(t.loss, 'name')} sigmoid"
        )


def _check_adaptive(cfg: Any) -> None:
    """``--adaptive-batch``: its settings, and what it cannot grow (what depends on ``B`` from
    the start)."""
    r, t, d = cfg.run, cfg.train, cfg.data
    adaptive = field_name(r, "adaptive_batch")
    if not r.adaptive_batch:
        for option, default in (("max_batch_size", None), ("adaptive_factor", 1.0),
                                ("adaptive_lr", "sqrt")):  # fmt: skip
            if getattr(r, option) != default:
                raise ValueError(
                    f"{field_name(r, option)} is a setting of {adaptive}: add it, or drop "
                    f"{field_name(r, option)}"
                )
        return
    b, top = r.batch_size, r.max_batch_size
    if not r.noise_scale_every:
        raise ValueError(
            f"{adaptive} grows the batch after the noise scale's measurements: add "
            f"{field_name(r, 'noise_scale_every')} K (e.g. 10)"
        )
    if top is None:
        raise ValueError(
            f"{adaptive} needs {field_name(r, 'max_batch_size')}: add it "
            f"({field_name(r, 'batch_size')} {b} times a power of 2, e.g. {4 * b})"
        )
    n = d.train_examples
    if n is not None and top > n:  # (setup checks a whole split's size)
        raise ValueError(
            f"{field_name(r, 'max_batch_size')} {top} is more than the "
            f"{field_name(d, 'train_examples')} {n}: lower it"
        )
    if top <= b or top % b or (top // b) & (top // b - 1):
        raise ValueError(
            f"{field_name(r, 'max_batch_size')} {top} must be {field_name(r, 'batch_size')} "
            f"{b} times a power of 2 (at least 2), e.g. {2 * b} or {4 * b}"
        )
    refused = [
        (t.negative_queue, field_name(t, "negative_queue"), "its queue holds B rows a step"),
        (t.stream, field_name(t, "stream"), "the streamed inputs are built for one B"),
        (d.hard_batches, field_name(d, "hard_batches"), "its batches are whole clusters of one B"),
        (t.loss.name in STATEFUL_LOSSES, f"{field_name(t.loss, 'name')} {t.loss.name}",
         "the noise meter cannot measure it"),
    ]  # fmt: skip
    for on, flag, why in refused:
        if on:
            raise ValueError(f"{adaptive} does not combine with {flag} ({why}): drop one")


def _check_global_temperature(cfg: Any) -> None:
    """The global loss's temperature can only be learned with a DRO radius ``ρ > 0``.

    Its objective ``τ log ĝ_i`` (``ĝ_i`` the mean of ``exp((h_ij − h_ii)/τ)`` over the
    negatives) falls as ``τ`` rises: its ``τ``-gradient is ``H(p_i) − log N_i + ρ``, with
    ``H(p_i) ≤ log N_i`` the entropy of the softmax over the ``N_i`` negatives. At ``ρ = 0``
    a learned global temperature grows without bound (measured: 0.1 to 28,000 in 2,700
    steps) and every individual ``τ_i`` climbs to its upper bound; ``ρ > 0`` gives them an
    equilibrium where ``H(p_i) = log N_i − ρ``. SogCLR itself fixes ``τ``.
    """
    t, m = cfg.train, cfg.model
    if t.loss.name not in STATEFUL_LOSSES or t.loss.rho > 0:
        return
    if t.loss.individual_temperature:
        raise ValueError(
            f"{field_name(t.loss, 'individual_temperature')} needs {field_name(t.loss, 'rho')} "
            "> 0: at rho 0 the global loss falls as a temperature rises (its gradient "
            "H(p_i) - log N_i <= 0), so every tau_i climbs to "
            f"{field_name(t.loss, 'max_temperature')}; set --rho (iSogCLR's DRO radius, e.g. 1)"
        )
    if m.learn_temperature:
        raise ValueError(
            f"{field_name(t.loss, 'name')} {t.loss.name} cannot learn its temperature at "
            f"{field_name(t.loss, 'rho')} 0: the loss falls as the temperature rises (its "
            "gradient H(p_i) - log N_i <= 0), so it would grow without bound; fix it as "
            "SogCLR does (--no-learn-temperature, --temperature 0.1), or set --rho > 0"
        )
