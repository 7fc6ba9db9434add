"""The learning rate per (loss, B, target): a grid of factors of 2 that extends itself.

Pure decisions on the tuning seed's rows (``{"exponent", "steps_to": {target: S or None},
"error"}``, one per rate of a cell), so that the harness only runs what they ask for:

- :func:`choose`: per target the exponent with the fewest steps (a miss counts as infinitely
  many; ties go to the smaller rate), and the runner-up;
- :func:`next_exponent`: while a target's choice sits at an end of the exponents run so far,
  the exponent one beyond that end, unless the end was already extended
  ``MAX_EXTENSIONS`` times or the rate beyond it was run and diverged or missed every
  target (then the choice stays at the end, and :func:`end_status` says why).

>>> rows = [{"exponent": k, "steps_to": {"4.1": s}} for k, s in [(-1, 90), (0, 60), (1, 40)]]
>>> choose(rows, [4.1])["4.1"]["exponent"], next_exponent(rows, [4.1], base=(-1, 0, 1))
(1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from experiments.study.protocol import MAX_EXTENSIONS

__all__ = ["choose", "next_exponent", "end_status"]


def _steps(row: dict, target: float) -> float:
    s = row["steps_to"].get(str(target))
    return math.inf if s is None else s


def choose(rows: Sequence[dict], targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per target (as ``str``): ``{exponent, steps, runner_up: {exponent, steps} | None}``;
    ``exponent`` None when no rate reached the target."""
    out = {}
    for t in targets:
        ranked = sorted(rows, key=lambda r: (_steps(r, t), r["exponent"]))
        best = ranked[0] if ranked and _steps(ranked[0], t) < math.inf else None
        second = ranked[1] if len(ranked) > 1 and _steps(ranked[1], t) < math.inf else None
        out[str(t)] = {
            "exponent": None if best is None else best["exponent"],
            "steps": None if best is None else _steps(best, t),
            "runner_up": None
            if second is None
            else {"exponent": second["exponent"], "steps": _steps(second, t)},
        }
    return out


def next_exponent(
    rows: Sequence[dict], targets: Sequence[float], *, base: Sequence[int]
) -> int | None:
    """The next exponent to run for this cell: the base grid first, then one beyond an end
    that a target's choice sits at, within ``MAX_EXTENSIONS`` of the base grid (None: the
    grid is settled). A rate beyond an end that was run becomes the new end, so a choice next
    to a diverged rate is interior: bracketed by the divergence."""
    have = {r["exponent"] for r in rows}
    missing = [k for k in base if k not in have]
    if missing:
        return min(missing)
    lo, hi = min(have), max(have)
    for c in choose(rows, targets).values():
        k = c["exponent"]
        if k == lo and lo - 1 >= min(base) - MAX_EXTENSIONS:
            return lo - 1
        if k == hi and hi + 1 <= max(base) + MAX_EXTENSIONS:
            return hi + 1
    return None


def end_status(rows: Sequence[dict], targets: Sequence[float]) -> dict[str, str]:
    """Per target, where its choice sits: ``interior``, with what bounds it when a
    neighbour diverged or missed the target; ``at the grid limit`` (an end the extension
    may not pass); ``no rate reached it``."""
    have = {r["exponent"]: r for r in rows}
    lo, hi = min(have), max(have)
    out = {}
    for t, c in choose(rows, targets).items():
        k = c["exponent"]
        if k is None:
            out[t] = "no rate reached it"
            continue
        if k in (lo, hi):
            out[t] = "at the grid limit"
            continue
        notes = []
        for side, j in (("below", k - 1), ("above", k + 1)):
            r = have.get(j)
            if r is not None and r.get("error"):
                notes.append(f"the rate {side} diverged")
            elif r is not None and _steps(r, float(t)) == math.inf:
                notes.append(f"the rate {side} missed it")
        out[t] = "interior" + (f" ({'; '.join(notes)})" if notes else "")
    return out
