"""Steps to a target against batch size: the first crossing, and McCandlish's fit.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, §2.3
and Appendix D) model the optimiser steps ``S`` and the examples ``E = B·S`` needed to reach a
fixed target at batch size ``B`` as

    S = S_min (1 + B_noise / B),        E = E_min (1 + B / B_noise),

with ``E_min = S_min · B_noise``: perfect scaling (``S ∝ 1/B``) well below ``B_noise``, and no
gain in steps well above it. The critical batch size is ``B_crit = E_min / S_min``; under the
model it equals ``B_noise``. Shallue et al. 2018 ("Measuring the Effects of Data Parallelism
on Neural Network Training", arXiv 1811.03600) measure the same curve with the learning rate
tuned per batch size, as the batch-size study does.

``S`` is linear in ``1/B`` (``S = S_min + E_min / B``), so the fit is a weighted linear least
squares problem, solved exactly (:func:`fit_critical_batch`); the weights ``1/S²`` fit the
relative error, so that the small steps of large batches count as much as the many steps of
small ones.

>>> sizes = [64, 256, 1024, 4096]
>>> fit = fit_critical_batch(sizes, [1000 * (1 + 512 / b) for b in sizes])
>>> round(fit["s_min"]), round(fit["e_min"]), round(fit["b_crit"])
(1000, 512000, 512)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.common.cli import shared_module

__all__ = ["first_crossing", "fit_critical_batch", "model_steps"]


def first_crossing(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first evaluated step at which ``values`` reach ``target`` (None: never).

    >>> first_crossing([10, 20, 40], [0.1, 0.5, 0.9], 0.5)
    20
    """
    for s, v in zip(steps, values, strict=True):
        if v is not None and v >= target:
            return int(s)
    return None


def fit_critical_batch(batch_sizes: Sequence[int], steps: Sequence[float]) -> dict[str, Any]:
    """Fit ``S = S_min (1 + B_noise / B)`` to steps-to-target; ``{s_min, e_min, b_crit, ...}``.

    Needs at least two batch sizes with a measured (not None) step count. Returns ``None``
    values when the data do not determine a positive ``S_min`` and ``E_min`` (for instance
    steps that do not fall with ``B``: no perfect-scaling regime was measured).
    """
    pts = [(b, s) for b, s in zip(batch_sizes, steps, strict=True) if s is not None]
    if len(pts) < 2:
        raise ValueError(
            f"the fit needs steps at two batch sizes or more, got {len(pts)}: widen the grid"
        )
    b = np.array([p[0] for p in pts], np.float64)
    s = np.array([p[1] for p in pts], np.float64)
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("batch sizes and steps must be positive")
    # Weighted least squares on S = a + c / B with weights 1 / S^2 (relative error).
    w = 1.0 / s
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) * w[:, None]
    (a, c), *_ = np.linalg.lstsq(design, s * w, rcond=None)
    ok = a > 0 and c > 0
    residual = float(np.sqrt(np.mean(((a + c / b) / s - 1.0) ** 2))) if ok else None
    return {
        "s_min": float(a) if ok else None,
        "e_min": float(c) if ok else None,
        "b_crit": float(c / a) if ok else None,
        "relative_rms_residual": residual,
        "points": len(pts),
    }


def model_steps(fit: dict[str, Any], batch_size: float) -> float:
    """``S(B)`` under a fit of :func:`fit_critical_batch` (NaN if the fit failed)."""
    if fit.get("s_min") is None:
        return math.nan
    return fit["s_min"] + fit["e_min"] / batch_size


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
