"""The streamed step's memory plan: ``python -m experiments.plan --stream``.

The streamed gradient cache (:mod:`contrastive.step.streamed.step`) never holds the raw batch:
each chunk of images and tokens is read from the host twice (embed, then pull back under
``jax.vjp``). What a device holds is then, per phase of the step, one compiled program's
buffers plus what stays resident between programs. With ``b = B/n`` rows per device,
embedding width ``D`` and float32 embeddings (:func:`contrastive.step.streamed.step.
streamed_footprint` adds the terms up):

    pass 1 = state + embeddings (2 b D 4) + one chunk's inputs + chunk peak
    loss   = state + embeddings + their gradients + accumulator + ring buffers
    pass 2 = state + gradients + accumulator + one chunk's inputs + chunk peak
    update = state + accumulator + update temporaries

where every measured term comes from XLA's buffer assignment of the step's own programs
(``step.lower``, compiled, ``memory_analysis()``, nothing allocated): the chunk peak is the
largest temporary of the per-chunk programs (``embed_x/y``, ``pull_x/y``: one chunk's
activations and its parameter gradient; independent of ``B``, so compiled once per mesh
and checked again at the answer), the ring buffers are the loss program's temporaries at
``B`` (the travelling ``y`` blocks, their gradient accumulators, the tiles), and the loss
program's alias bytes tell whether the gradients overwrite the donated embeddings. State
is the parameters plus the AdamW moments as held on one device; the accumulator is one
parameter-sized float32 buffer.

The answer's row names its limiting buffer (the largest term of the peaking phase) and
the bytes per pair (the peaking phase's terms that grow with ``B``, over ``b``). The
host holds two chunks of raw inputs per device (the one computing and the one prefetched).

Targets (issue 19): ViT-L/14 at 80 GiB, at least 16M pairs on 8 devices and 64M on 32;
for reference, Inf-CL (Cheng et al. 2024, arXiv 2410.17243) trains 4,096k pairs on
8 A800 80 GB and 12,288k on 32 with CPU offload. GradCache: Gao et al. 2021.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments.common.cli import shared_module
from experiments.common.planning import (
    INF_CL,
    StepPlan,
    abstract_clip,
    affine_fit,
    largest_batch,
)
from losses._tiles import DEFAULT_TILE  # the ring loss's tile edge (rows) when none is given

STEP = "streamed"
STEM = "plan_streamed"
PER_CHUNK = ("embed_x", "embed_y", "pull_x", "pull_y")
PROGRAMS = ("loss", *PER_CHUNK, "update")  # the step's programs that hold bytes
MIB = 2**20
TARGETS = {("vit-l-14", 8): 16 * MIB, ("vit-l-14", 32): 64 * MIB}  # issue 19, pairs
# The terms each phase of the step holds (streamed_footprint's sums, named).
PHASE_TERMS = {
    "pass1": ("state", "embeddings", "chunk_input", "chunk_peak"),
    "loss": ("state", "embeddings", "embedding_grads", "accumulator", "ring"),
    "pass2": ("state", "embedding_grads", "accumulator", "chunk_input", "chunk_peak"),
    "update": ("state", "accumulator", "update_temp"),
}
BUFFERS = {
    "state": "parameters + AdamW state",
    "accumulator": "gradient accumulator",
    "embeddings": "embeddings x, y",
    "embedding_grads": "gradients of the embeddings",
    "ring": "ring loss buffers",
    "chunk_input": "one chunk's raw inputs",
    "chunk_peak": "one chunk's activations",
    "update_temp": "optimiser update",
}
BATCH_TERMS = ("embeddings", "embedding_grads", "ring")  # the terms that grow with B
# What would lift the batch, by the limiting buffer.
LIFTS = {
    "ring": "bfloat16 embeddings (the travelling y blocks halve; gradient sums stay float32)",
    "embeddings": "bfloat16 embedding storage (halves it)",
    "embedding_grads": "bfloat16 embedding storage (halves it)",
    "state": "--shard-optimizer (the AdamW moments split over the devices)",
    "update_temp": "--shard-optimizer (the update of a 1/n share per device)",
    "accumulator": "more devices (it does not shrink with the batch)",
    "chunk_peak": "--remat or a smaller --chunk-rows",
    "chunk_input": "a smaller --chunk-rows",
}


def phase_terms(phase: str, in_place: bool) -> tuple[str, ...]:
    """The terms of ``phase``; the loss phase's gradients overwrite the donated embeddings
    when ``in_place`` (they are then no buffer of their own)."""
    terms = PHASE_TERMS[phase]
    return tuple(t for t in terms if not (in_place and phase == "loss" and t == "embedding_grads"))


def memory_of(lowered: Any) -> dict[str, int]:
    """Compile a ``jax.stages.Lowered`` and read XLA's per-device buffer assignment."""
    m = lowered.compile().memory_analysis()
    out = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0)),
    }
    out["total_bytes"] = (
        out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    )
    return out


def _device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of a tree of ShapeDtypeStructs on one device (a shard of a sharded leaf)."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(tree)
    shards = [None] * len(leaves) if shardings is None else jax.tree_util.tree_leaves(shardings)
    total = 0
    for a, s in zip(leaves, shards, strict=True):
        shape = a.shape if s is None else s.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def build_streamed_step(
    model: str,
    devices: int,
    *,
    chunk_rows: int,
    remat: bool = False,
    shard_optimizer: bool = False,
) -> StepPlan:
    """The streamed step of ``model`` on ``devices`` CPU devices, as a :class:`StepPlan`.

    ``measure(batch)`` lowers the step's programs for ``batch`` pairs, compiles the loss
    program (and, the first time, the per-chunk and update programs, whose temporaries do
    not depend on the batch) and returns ``{"total_bytes": peak, "footprint": ...,
    "programs": ..., "in_place": ...}``; ``measure(batch, programs=PROGRAMS)`` compiles
    them all (or those named). The quantum is ``devices · lcm(chunk_rows, 1024)``: whole
    chunks (no ragged last chunk) and whole loss tiles per device. The ring loss pads a
    device's rows to a whole number of its 1024-row tiles, with a padded copy of a ``(b,
    D)`` block: a batch one chunk past a multiple of 1024 rows per device can need more
    bytes than the aligned one above it, so the plan counts aligned batches (a 0.03 % step
    at 3M rows).
    """
    import jax

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.step import gradcache
    from contrastive.step.streamed.step import make_streamed_step, streamed_footprint
    from contrastive.step.train_step import state_shardings, tower_fns

    setup = abstract_clip(
        model, devices, chunk_rows=chunk_rows, remat=remat, shard_optimizer=shard_optimizer
    )
    state, mesh = setup.state, setup.mesh
    step = make_streamed_step(setup.graphdef, setup.config, mesh, tx=setup.tx)
    chunk = setup.config.chunk_size
    x, y = models.clip_input_spec(model, chunk, mesh_lib.batch_sharding(mesh))
    towers = tower_fns(setup.graphdef)
    emb = [jax.eval_shape(f, state.params, s, None) for f, s in zip(towers, (x, y), strict=True)]
    if emb[0].shape[1:] != emb[1].shape[1:] or emb[0].dtype != emb[1].dtype:
        raise ValueError(f"towers embed differently: {emb[0]} vs {emb[1]}")
    width, itemsize = emb[0].shape[1], emb[0].dtype.itemsize
    params = _device_bytes(state.params)
    shard = state_shardings(state, mesh, shard_optimizer=shard_optimizer)
    rest = _device_bytes(state, shard) - params  # optimiser state (and the step counter)
    acc_tree = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, gradcache.accumulator_dtype(p)), state.params
    )
    fixed: dict[str, dict] = {}

    def measure(batch: int, programs: Sequence[str] | None = None) -> dict:
        lowered = step.lower(state, batch_sizes=(batch, batch), x=x, y=y)
        names = programs or (PROGRAMS if not fixed else ("loss",))
        measured = {**fixed, **{name: memory_of(lowered[name]) for name in names}}
        if not fixed:
            fixed.update({k: v for k, v in measured.items() if k != "loss"})
        embeddings = 2 * (batch // devices) * width * itemsize
        in_place = measured["loss"]["alias_bytes"] >= embeddings
        f = streamed_footprint(
            batch_size=batch,
            devices=devices,
            embed_dim=width,
            embed_itemsize=itemsize,
            params_bytes=params,
            opt_state_bytes=rest,
            accumulator_bytes=_device_bytes(acc_tree),
            chunk_peak_bytes=max(measured[k]["temp_bytes"] for k in PER_CHUNK),
            chunk_input_bytes=_device_bytes((x, y)) // devices,
            loss_temp_bytes=measured["loss"]["temp_bytes"],
            embedding_grads_in_place=in_place,
            update_temp_bytes=measured["update"]["temp_bytes"],
        )
        return {
            "total_bytes": f["peak"],
            "footprint": f,
            "programs": measured,
            "in_place": in_place,
            "embed_dim": width,
            "embedding_dtype": str(emb[0].dtype),
            "compiles": len(names),
        }

    quantum = devices * math.lcm(chunk_rows, DEFAULT_TILE)
    return StepPlan(model, devices, chunk, remat, measure, quantum)


def bytes_per_pair(point: dict, batch: int, devices: int) -> float:
    """Bytes per pair a device holds: the terms of the peaking phase that grow with the batch
    (embeddings, their gradients, the ring's buffers) over the device's ``B / n`` rows."""
    phase = limiting_buffer(point)[0]
    grow = [t for t in phase_terms(phase, point["in_place"]) if t in BATCH_TERMS]
    return sum(point["footprint"][t] for t in grow) / (batch // devices)


def limiting_buffer(point: dict) -> tuple[str, str, int]:
    """(peaking phase, largest term of it, its bytes) of one measured point."""
    f = point["footprint"]
    phase = max(PHASE_TERMS, key=lambda p: f[p])
    term = max(phase_terms(phase, point["in_place"]), key=lambda t: f[t])
    return phase, term, f[term]


def plan_streamed(
    model: str,
    devices: int,
    limit: int,
    *,
    chunk_rows: int,
    remat: bool = False,
    shard_optimizer: bool = False,
    seed: tuple[float, float] | None = None,
) -> dict:
    """Search the largest streamed batch under ``limit`` and summarise it as a record.

    The answer is compiled again with every program, so that the per-chunk programs'
    temporaries are measured at the batch planned (RuntimeError if they moved).
    """
    start = time.perf_counter()
    plan = build_streamed_step(
        model, devices, chunk_rows=chunk_rows, remat=remat, shard_optimizer=shard_optimizer
    )
    found = largest_batch(plan, limit, seed=seed)
    best, points = found["largest_global_batch"], found["points"]
    record: dict[str, Any] = {
        "model": model,
        "devices": devices,
        "memory_limit_bytes": limit,
        "largest_global_batch": best,
        "chunk_size": plan.chunk_size,
        "step": STEP,
        "remat": remat,
        "shard_optimizer": shard_optimizer,
        "quantum": plan.quantum,
    }
    at = {}
    if best is not None:
        at = plan.measure(best, programs=PROGRAMS)
        if at["total_bytes"] != points[best]["total_bytes"]:
            raise RuntimeError(
                f"{model} on {devices} devices, B={best}: the per-chunk programs' bytes "
                f"changed with the batch ({points[best]['total_bytes']} != "
                f"{at['total_bytes']}); the plan's model of them does not hold"
            )
        phase, term, term_bytes = limiting_buffer(at)
        f = at["footprint"]
        record |= {
            "per_device_bytes": at["total_bytes"],
            "peak_phase": phase,
            "limiting_buffer": term,
            "limiting_bytes": term_bytes,
            "bytes_per_pair": round(bytes_per_pair(at, best, devices), 1),
            "host_bytes_per_device": 2 * f["chunk_input"],
            "embed_dim": at["embed_dim"],
            "embedding_dtype": at["embedding_dtype"],
            "embedding_grads_in_place": at["in_place"],
            "terms_bytes": {t: f[t] for t in BUFFERS},
            "phases_bytes": {p: f[p] for p in PHASE_TERMS},
            "programs": at["programs"],
        }
    above = points.get(None if best is None else best + plan.quantum)
    record |= {
        "next_batch_bytes": None if above is None else above["total_bytes"],
        "target_global_batch": TARGETS.get((model, devices)),
        "inf_cl": INF_CL.get(devices) if model == "vit-l-14" else None,
        "compiles": sum(p["compiles"] for p in points.values()) + at.get("compiles", 0),
        "seconds": round(time.perf_counter() - start, 1),
        "points": {str(b): p["total_bytes"] for b, p in sorted(points.items())},
        "affine_fit": affine_fit(points, devices, limit) if len(points) > 1 else None,
    }
    return record


def _pairs(n: int) -> str:
    return f"{n / MIB:.1f}M" if n >= MIB else f"{n:,}"


def target_lines(records: list[dict]) -> list[str]:
    """One line per target met or missed; a miss says by how much and what would lift it."""
    from experiments.common.benchmarking import fmt_bytes

    lines = []
    for r in records:
        want = TARGETS.get((r["model"], r["devices"]))
        if want is None or r.get("memory_limit_bytes") != 80 * 2**30:
            continue
        got = r["largest_global_batch"] or 0
        head = f"- {r['model']} on {r['devices']} devices, target ≥ {_pairs(want)} pairs: "
        if got >= want:
            lines.append(head + f"met, {_pairs(got)} ({got / want:.2f}× the target).")
            continue
        short = (want - got) / r["devices"] * (r.get("bytes_per_pair") or 0)
        term = r.get("limiting_buffer")
        lines.append(
            head + f"short, {_pairs(got)} ({got / want:.2f}×): {fmt_bytes(short)} per device "
            f"too many at the target; the limiting buffer is {BUFFERS.get(term, term)}; "
            f"{LIFTS.get(term, 'more devices')} would lift it."
        )
    return lines


def markdown(records: list[dict], limit: int) -> str:
    """The streamed table: per model and device count, the batch and where the bytes go."""
    from experiments.common.benchmarking import fmt_bytes

    lines = [
        f"Largest global batch of the streamed gradient cache (`contrastive.step.streamed.step`: "
        f"raw inputs read from the host chunk by chunk, twice) whose per-device peak fits "
        f"{fmt_bytes(limit)}. Peak: the largest phase (pass 1, loss, pass 2, update) of the "
        "step's compiled programs (XLA:CPU buffer assignment, compile only) plus the buffers "
        "resident between them. CLIP two-tower models, bf16 compute, f32 parameters, AdamW, "
        "ring InfoNCE, float32 embeddings; uint8 images and int32 tokens. Bytes per pair: "
        "per device, per pair it holds. Host: two chunks of raw inputs per device. Batches "
        "are multiples of 1024 rows per device (whole tiles of the ring loss, which pads a "
        "ragged block with a copy of it).",
        "",
        "| model | devices | chunk/device | largest global batch | per-device peak (phase) "
        "| limiting buffer | bytes per pair | host bytes per device | Inf-CL (published) |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in records:
        best = r["largest_global_batch"]
        if best is None:
            cells = ["does not fit", "", "", "", ""]
        else:
            cells = [
                f"{best:,}",
                f"{fmt_bytes(r['per_device_bytes'])} ({r['peak_phase']})",
                f"{BUFFERS[r['limiting_buffer']]} ({fmt_bytes(r['limiting_bytes'])})",
                f"{r['bytes_per_pair']:,.0f}",
                fmt_bytes(r["host_bytes_per_device"]),
            ]
        lines.append(
            f"| {r['model']} | {r['devices']} | {r['chunk_size'] // r['devices']} | "
            + " | ".join(cells)
            + f" | {r.get('inf_cl') or ''} |"
        )
    fitted = [r for r in records if r["largest_global_batch"]]
    if fitted:
        lines += ["", "Where the bytes go at that batch (per device):", ""]
        lines.append("| model | devices | " + " | ".join(BUFFERS.values()) + " |")
        lines.append("|---|---:|" + "---:|" * len(BUFFERS))
        for r in fitted:
            t = r["terms_bytes"]
            cells = [fmt_bytes(t[k]) for k in BUFFERS]
            if r["embedding_grads_in_place"]:
                cells[list(BUFFERS).index("embedding_grads")] += " (in place)"
            lines.append(f"| {r['model']} | {r['devices']} | " + " | ".join(cells) + " |")
    targets = target_lines(records)
    if targets:
        lines += ["", "Targets (issue 19; Inf-CL, Cheng et al. 2024, for reference):", ""]
        lines += targets
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
