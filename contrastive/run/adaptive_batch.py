"""An adaptive global batch (``--adaptive-batch``): grow ``B`` while the run trains, driven by
the gradient noise scale the run measures every ``--noise-scale-every`` steps.

The rule (:func:`grown_batch_size`). McCandlish et al. (2018) predict the critical batch
``B_crit ~ B_simple = B V / |G|^2`` (:class:`contrastive.run.noise_meter.NoiseMeter`): below it
a bigger batch buys nearly proportionally fewer steps. At a measurement with estimate
``b`` and current batch ``B``, with ``f = --adaptive-factor`` and ``M = --max-batch-size``:

    grow  iff  b is finite, b >= 0, b >= f B  and  2 B <= M;
    B' = B 2^k  with the largest k >= 1 such that  B 2^k <= max(2 B, min(M, b / f)).

Our study measured ``B_simple`` 5-10x below the fitted ``B_crit`` of InfoNCE and DCL, so a
factor below 1 grows earlier than the plain prediction.

The learning rate (:func:`lr_multiplier`): on ``B -> B'`` the peak learning rate (the whole
warm-up + cosine schedule, which goes on at the optimiser's step count) is multiplied by
``sqrt(B'/B)`` (``sqrt``: the study's tuned rates follow ``4e-3 sqrt(B/256)`` within a
factor 2 up to ``B = 1024``), ``B'/B`` (``linear``) or 1 (``constant``).

The data stream stays contiguous. The run's examples come in one global order that does
not depend on ``B`` (:class:`contrastive.data.pipeline.TrainExamples`: batch ``s`` at size
``B`` is examples ``[s B, (s + 1) B)``), so a growth decided after step ``t`` takes effect
at the first step boundary where the examples trained on so far, ``E``, are a multiple of
``B'`` (:func:`switch_step`; at most ``B'/B - 1`` more steps at ``B``), and from there the
run trains on batch ``E / B'`` of size ``B'``, then ``E / B' + 1``, ... Every example is
trained on once per epoch, whatever the batch sizes.

A run is a list of phases (:class:`Phase`): ``step`` (the first step trained at this
size), ``batch_size``, ``offset`` (examples trained on before it) and ``learning_rate`` (its
peak rate). The last phase may start after the current step (a growth decided, waiting for
its aligned step). The list is part of each checkpoint's metadata, so a resumed run
rebuilds its phase, and the one it waits for, exactly.

>>> phases = [Phase(step=1, batch_size=64, offset=0, learning_rate=1e-3)]
>>> grown_batch_size(300.0, 64, max_batch_size=1024, factor=1.0)
256
>>> nxt = next_phase(phases, decided_after=3, new_batch_size=256, rule="sqrt")
>>> nxt.step, nxt.offset, nxt.offset // nxt.batch_size, round(nxt.learning_rate, 6)
(5, 256, 1, 0.002)
>>> phases.append(nxt)
>>> [(t, data_step(phases, t), examples_after(phases, t)) for t in (4, 5, 6)]
[(4, 4, 256), (5, 2, 512), (6, 3, 768)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LR_RULES",
    "Phase",
    "grown_batch_size",
    "lr_multiplier",
    "switch_step",
    "next_phase",
    "phase_at",
    "data_step",
    "examples_after",
    "phases_to_json",
    "phases_from_json",
    "BatchPhases",
]

LR_RULES = ("sqrt", "linear", "constant")
META_KEY = "batch_phases"  # in a checkpoint's metadata (adaptive runs only)


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``step, step + 1, ...`` (until the next phase) train at ``batch_size`` with the
    peak ``learning_rate``; ``offset`` examples were trained on before ``step``."""

    step: int
    batch_size: int
    offset: int
    learning_rate: float


def grown_batch_size(
    b_simple: float, batch_size: int, *, max_batch_size: int, factor: float
) -> int | None:
    """The batch to grow to after a measurement of ``b_simple`` at ``batch_size``, or None.

    >>> grown_batch_size(100.0, 64, max_batch_size=1024, factor=1.0)  # 2B > b: still 2B
    128
    >>> grown_batch_size(5000.0, 64, max_batch_size=1024, factor=1.0)  # capped by the max
    1024
    >>> grown_batch_size(60.0, 64, max_batch_size=1024, factor=1.0) is None  # below f B
    True
    >>> grown_batch_size(60.0, 64, max_batch_size=1024, factor=0.1)  # b / f = 600
    512
    >>> grown_batch_size(float("nan"), 64, max_batch_size=1024, factor=1.0) is None
    True
    >>> grown_batch_size(1e9, 1024, max_batch_size=1024, factor=1.0) is None  # at the max
    True
    """
    if not (math.isfinite(b_simple) and b_simple >= 0) or factor <= 0:
        return None
    if b_simple < factor * batch_size or 2 * batch_size > max_batch_size:
        return None
    limit = min(max_batch_size, b_simple / factor)
    new = 2 * batch_size
    while 2 * new <= limit:
        new *= 2
    return new


def lr_multiplier(rule: str, old_batch_size: int, new_batch_size: int) -> float:
    """The factor on the peak learning rate when the batch grows ``old -> new``.

    >>> [lr_multiplier(r, 64, 256) for r in LR_RULES]
    [2.0, 4.0, 1.0]
    """
    ratio = new_batch_size / old_batch_size
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "linear":
        return ratio
    if rule == "constant":
        return 1.0
    raise ValueError(f"unknown learning-rate rule {rule!r}: use one of {', '.join(LR_RULES)}")


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase that trains step ``step`` (the last one that has begun by then)."""
    current = phases[0]
    for p in phases:
        if p.step <= step:
            current = p
    return current


def examples_after(phases: Sequence[Phase], step: int) -> int:
    """Examples trained on after step ``step`` (``step`` included)."""
    p = phase_at(phases, step)
    return p.offset + (step - p.step + 1) * p.batch_size


def data_step(phases: Sequence[Phase], step: int) -> int:
    """The input step (1-based batch index at the phase's size) that loop step ``step``
    trains on: ``offset / B + step - phase.step + 1``."""
    p = phase_at(phases, step)
    return p.offset // p.batch_size + step - p.step + 1


def switch_step(examples_seen: int, step: int, batch_size: int, new_batch_size: int) -> int:
    """The first step after ``step`` whose preceding examples are a multiple of the new batch.

    ``examples_seen``: trained on after ``step`` at ``batch_size`` (a multiple of it).

    >>> switch_step(3 * 64, 3, 64, 256), switch_step(4 * 64, 4, 64, 256)
    (5, 5)
    """
    if examples_seen % batch_size or new_batch_size % batch_size:
        raise ValueError(
            f"examples_seen {examples_seen} and new_batch_size {new_batch_size} must be "
            f"multiples of batch_size {batch_size}"
        )
    behind = -examples_seen % new_batch_size  # examples still to train at the old size
    return step + 1 + behind // batch_size


def next_phase(
    phases: Sequence[Phase], *, decided_after: int, new_batch_size: int, rule: str
) -> Phase:
    """The phase a growth to ``new_batch_size``, decided after step ``decided_after``, starts."""
    p = phase_at(phases, decided_after)
    seen = examples_after(phases, decided_after)
    start = switch_step(seen, decided_after, p.batch_size, new_batch_size)
    return Phase(
        step=start,
        batch_size=new_batch_size,
        offset=p.offset + (start - p.step) * p.batch_size,
        learning_rate=p.learning_rate * lr_multiplier(rule, p.batch_size, new_batch_size),
    )


def phases_to_json(phases: Sequence[Phase]) -> list[dict[str, Any]]:
    """The phases as JSON (a checkpoint's metadata)."""
    return [dataclasses.asdict(p) for p in phases]


def phases_from_json(rows: Sequence[dict[str, Any]]) -> list[Phase]:
    """:func:`phases_to_json` back."""
    return [
        Phase(int(r["step"]), int(r["batch_size"]), int(r["offset"]), float(r["learning_rate"]))
        for r in rows
    ]


class BatchPhases:
    """The phases of a run while it trains (:func:`contrastive.run.loop.train`): one phase at
    ``--batch-size``, and with ``--adaptive-batch`` those its measurements add.

    ``meta``: a checkpoint's metadata (its phases, if any, are the run's so far).
    """

    def __init__(self, cfg: Any, meta: dict | None = None):
        r = cfg.run
        self.adaptive = bool(r.adaptive_batch)
        self.max_batch_size, self.factor, self.rule = (
            r.max_batch_size,
            r.adaptive_factor,
            r.adaptive_lr,
        )
        rows = (meta or {}).get(META_KEY)
        first = Phase(1, r.batch_size, 0, cfg.train.optim.learning_rate)
        self.phases = phases_from_json(rows) if rows else [first]

    def at(self, step: int) -> Phase:
        return phase_at(self.phases, step)

    def data_step(self, step: int) -> int:
        return data_step(self.phases, step)

    def starts(self, step: int) -> bool:
        """Step ``step`` is the first of a grown batch."""
        return step > 1 and self.at(step).step == step

    def record(self, step: int) -> dict[str, int]:
        """What every metrics record of step ``step`` says of the batch."""
        return {
            "batch_size": self.at(step).batch_size,
            "examples": examples_after(self.phases, step),
        }

    def meta(self) -> dict[str, Any]:
        """For a checkpoint's metadata (nothing for a run at one batch size)."""
        return {META_KEY: phases_to_json(self.phases)} if self.adaptive else {}

    def after_measurement(self, step: int, b_simple: float) -> dict[str, Any]:
        """Decide on a growth after the measurement of step ``step``; the record's fields
        that say so (none when the batch stays, or a growth is already waiting)."""
        if not self.adaptive or self.phases[-1].step > step:
            return {}
        p = self.at(step)
        new = grown_batch_size(
            b_simple, p.batch_size, max_batch_size=self.max_batch_size, factor=self.factor
        )
        if new is None:
            return {}
        nxt = next_phase(self.phases, decided_after=step, new_batch_size=new, rule=self.rule)
        self.phases.append(nxt)
        return {"next_batch_size": new, "next_batch_from_step": nxt.step,
                "next_learning_rate": nxt.learning_rate}  # fmt: skip
