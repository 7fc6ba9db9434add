"""What the memory planners share: byte sizes, the abstract CLIP state, the batch search.

``experiments/plan.py`` sizes the in-memory gradient-cached step and, with ``--stream``,
the streamed one (:mod:`experiments.common.streamed_plan`). Both compile only and search
the largest global batch whose per-device bytes fit a limit:

- :func:`parse_bytes`: ``"80GiB"`` -> bytes (binary and decimal units);
- :func:`abstract_clip`: a CLIP model's mesh, config, optimiser, graph and train state as
  ``jax.ShapeDtypeStruct`` s (nothing allocated);
- :class:`StepPlan`, :func:`largest_batch`, :func:`affine_fit`: the search, which needs
  only ``measure(batch) -> {"total_bytes": ...}``.

Reference figures: Cheng et al. 2024 (Inf-CL, arXiv 2410.17243), ViT-L/14 with 4,096k
pairs on 8 A800 (80 GB) and 12,288k on 32, with the data offloaded to CPU memory.

>>> parse_bytes("80GiB")
85899345920
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments.common.cli import shared_module

INF_CL = {8: "4,096k", 32: "12,288k"}  # Inf-CL, ViT-L/14, A800 80 GB, CPU offload
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '80GB' -> 80e9, '1024' -> 1024 (binary and decimal units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--memory {text!r}: give a size such as 80GiB, 80GB or 1024")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 1:
        raise ValueError(f"--memory {text!r}: give a positive size such as 80GiB")
    return size


def int_list(text: str, flag: str) -> list[int]:
    """``"8,32"`` -> ``[8, 32]``; ValueError naming ``flag`` for anything but positive ints."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers such as 8,32") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: give positive integers such as 8,32")
    return values


@dataclasses.dataclass
class AbstractClip:
    """A CLIP train set-up as shapes: nothing is allocated (see :func:`abstract_clip`)."""

    mesh: Any
    config: Any  # contrastive.configs.TrainConfig
    tx: Any  # the optax optimiser
    graphdef: Any
    state: Any  # TrainState of jax.ShapeDtypeStruct


def abstract_clip(
    model: str,
    devices: int,
    *,
    chunk_rows: int | None,
    remat: bool = False,
    shard_optimizer: bool = False,
) -> AbstractClip:
    """The CLIP model ``model`` (bf16 compute, f32 parameters), AdamW and the ring InfoNCE
    loss on the first ``devices`` CPU devices; ``chunk_rows`` per device per chunk (None:
    no gradient cache). The model is built under ``nnx.eval_shape``: no parameter exists."""
    import jax
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.step import train_step as ts
    from contrastive.step.optim import make_optimizer
    from contrastive.step_configs import LossConfig, OptimConfig, TrainConfig

    mesh = mesh_lib.make_mesh(jax.devices("cpu"), num_devices=devices)
    cfg = TrainConfig(
        loss=LossConfig("infonce"),
        optim=OptimConfig("adamw"),
        chunk_size=None if chunk_rows is None else chunk_rows * devices,
        shard_optimizer=shard_optimizer,
    )
    tx = make_optimizer(cfg.optim)

    def build():
        return models.clip_model(model, remat=remat, rngs=nnx.Rngs(0))

    graphdef, _ = nnx.split(nnx.eval_shape(build))
    state = jax.eval_shape(lambda: ts.create_train_state(build(), tx)[1])
    return AbstractClip(mesh, cfg, tx, graphdef, state)


@dataclasses.dataclass
class StepPlan:
    """One train step to size: a model on a mesh, gradient-cached (chunk) or plain."""

    model: str
    devices: int
    chunk_size: int | None  # global rows per chunk; None: plain step
    remat: bool
    measure: Callable[[int], dict]  # global batch -> {"total_bytes": ..., ...}
    quantum: int  # batch granularity: the chunk (cached) or one row per device (plain)


def affine_fit(points: dict[int, dict], devices: int, limit: int) -> tuple[float, float]:
    """(bytes at no rows, bytes per local row) through the two points nearest ``limit``.

    Per-device memory is affine in the rows a device holds, ``B / devices``, with nearly
    the same constants on any number of devices (replicated state, per-row buffers): the
    fit of one device count seeds the search on the next.
    """
    near = sorted(points, key=lambda b: abs(points[b]["total_bytes"] - limit))[:2]
    (b1, t1), (b2, t2) = sorted((b, points[b]["total_bytes"]) for b in near)
    per_row = (t2 - t1) / ((b2 - b1) / devices)
    return t1 - per_row * b1 / devices, per_row


def largest_batch(
    plan: StepPlan,
    limit: int,
    *,
    seed: tuple[float, float] | None = None,
    probe: Sequence[int] = (64, 128),
    max_compiles: int = 40,
) -> dict:
    """The largest multiple of ``plan.quantum`` whose per-device bytes fit ``limit``.

    The first guess is the root of an affine model of the bytes: ``seed`` (from
    :func:`affine_fit` on another device count), or two compiles at ``probe`` quanta.
    Then, with ``lo`` the largest compiled batch that fits and ``hi`` the smallest that
    does not, it cycles through: the secant's root between them (the affine model's while
    one side is missing), its neighbour one quantum towards the limit (where the answer
    usually is), and the bracket's midpoint (so the bracket at least halves every three
    compiles, whatever the shape). Every batch is a multiple of the quantum strictly
    inside the bracket. It stops when ``hi = lo + quantum``. Returns the answer (None when
    one quantum does not fit) and every compiled point.
    """
    q, n = plan.quantum, plan.devices
    points: dict[int, dict] = {}

    def total(b: int) -> int:
        if b not in points:
            if len(points) >= max_compiles:
                raise RuntimeError(f"no answer after {max_compiles} compiles: {sorted(points)}")
            points[b] = plan.measure(b)
        return points[b]["total_bytes"]

    if seed is None:
        for k in probe:
            total(k * q)
        seed = affine_fit(points, n, limit)
    base, per_row = seed
    guess = int(n * (limit - base) / per_row) if per_row > 0 else q
    last, phase = None, "model"
    while True:
        fit = [b for b in points if points[b]["total_bytes"] <= limit]
        over = [b for b in points if points[b]["total_bytes"] > limit]
        lo, hi = max(fit, default=None), min(over, default=None)
        if hi == q:
            return {"largest_global_batch": None, "points": points}
        if lo is not None and hi is not None and hi - lo <= q:
            return {"largest_global_batch": lo, "points": points}
        if phase == "neighbour":  # a root is usually within a quantum of the guess
            guess = last + q if points[last]["total_bytes"] <= limit else last - q
            phase = "bisect"
        elif lo is not None and hi is not None and phase == "bisect":
            guess, phase = (lo + hi) // 2, "secant"
        elif lo is not None and hi is not None:
            t_lo, t_hi = points[lo]["total_bytes"], points[hi]["total_bytes"]
            guess = int(lo + (limit - t_lo) * (hi - lo) / (t_hi - t_lo))
            phase = "neighbour"
        else:  # one side only: the affine model through the two nearest points
            if last is not None:
                base, per_row = affine_fit(points, n, limit)
                guess = int(n * (limit - base) / per_row) if per_row > 0 else 2 * (lo or q)
            phase = "neighbour"
        # A multiple of the quantum strictly inside the bracket: never compiled before.
        guess = guess // q * q
        guess = max(guess, q if lo is None else lo + q)
        if hi is not None:
            guess = min(guess, hi - q)
        total(guess)
        last = guess


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
