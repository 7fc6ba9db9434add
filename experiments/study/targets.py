"""Targets every cell clears: the pilot curves' plateaus, their evaluation noise, the rule.

A target on a batch size's plateau measures noise crossings, not training speed: the first
step at which a flat, noisy curve dips below a level is a draw from the noise. The rule
(protocol item 4) puts every target at least ``MARGIN_SD`` evaluation-noise standard
deviations above every cell's plateau (the metric is a loss: lower is better), so that every
cell crosses it while it is still learning.

>>> curve = [[10, 5.0], [40, 4.5], [80, 4.0], [90, 4.2], [100, 4.0]]  # steps 71-100 the tail
>>> p = plateau(curve, 100)
>>> p["plateau"], round(p["noise_sd"], 4)  # the median; sd of the differences / sqrt(2)
(4.0, 0.1414)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from experiments.study.protocol import EASIER_OFFSET, MARGIN_SD, PLATEAU_SHARE, round_up

__all__ = ["plateau", "choose_targets", "margins"]


def plateau(curve: Sequence[Sequence[float]], length: int) -> dict[str, Any]:
    """The plateau of a pilot's curve ``[[step, value], ...]`` of ``length`` steps.

    ``plateau``: the median of the values evaluated in the last ``PLATEAU_SHARE`` of the
    steps; ``noise_sd``: the standard deviation of their successive differences over
    ``sqrt(2)`` (the evaluation-to-evaluation noise, with a slow trend mostly removed);
    ``evaluations``: how many there were. ValueError if fewer than 3.
    """
    start = length * (1 - PLATEAU_SHARE)
    tail = [v for s, v in curve if s > start and v is not None]
    if len(tail) < 3:
        raise ValueError(
            f"the pilot has {len(tail)} evaluations in its last {PLATEAU_SHARE:.0%}: "
            "too few to measure a plateau (lengthen it or evaluate more often)"
        )
    diffs = [b - a for a, b in zip(tail, tail[1:], strict=False)]
    # A noiseless tail (a toy run) still needs a positive noise for the margin rule.
    noise = max(statistics.pstdev(diffs) / math.sqrt(2), 1e-6)
    return {"plateau": statistics.median(tail), "noise_sd": noise, "evaluations": len(tail)}


def choose_targets(plateaus: Sequence[dict]) -> dict[str, Any]:
    """The two targets from the cells' plateaus ``[{loss, batch_size, plateau, noise_sd}]``.

    ``harder = round_up(max(p + MARGIN_SD * sd))`` and ``easier = harder + EASIER_OFFSET``;
    ``binding``: the cell that set the harder one.

    >>> cells = [{"loss": "a", "batch_size": 64, "plateau": 4.0, "noise_sd": 0.02},
    ...          {"loss": "a", "batch_size": 256, "plateau": 3.5, "noise_sd": 0.01}]
    >>> choose_targets(cells)["targets"]
    [4.1, 4.6]
    """
    if not plateaus:
        raise ValueError("no pilot plateaus to set targets from: run the pilot stage first")
    top = max(plateaus, key=lambda c: c["plateau"] + MARGIN_SD * c["noise_sd"])
    harder = round_up(top["plateau"] + MARGIN_SD * top["noise_sd"])
    easier = round(harder + EASIER_OFFSET, 10)
    return {
        "targets": [harder, easier],
        "binding": {"loss": top["loss"], "batch_size": top["batch_size"]},
    }


def margins(plateaus: Sequence[dict], targets: Sequence[float]) -> list[dict]:
    """Per cell and target, the margin ``(target - plateau) / noise_sd`` in noise SDs; a cell
    whose margin is below ``MARGIN_SD`` cannot clear that target (``clears`` False)."""
    out = []
    for c in plateaus:
        for t in targets:
            m = (t - c["plateau"]) / c["noise_sd"]
            out.append(
                {
                    "loss": c["loss"],
                    "batch_size": c["batch_size"],
                    "target": t,
                    "margin_sd": m,
                    "clears": m >= MARGIN_SD,
                }
            )
    return out
