"""What the device check measures: planner against device memory, loss speed, streamed step.

:class:`Sizes` holds every size of one check (:data:`FULL` for a GPU, :data:`REDUCED` for a
CPU and CI). The three measurements, each returning plain JSON-able rows:

- :func:`check_planner`: the planner's largest batch of a small CLIP step and its predicted
  peak, then that step run once on the device and its allocator's measured peak;
- :func:`time_losses`: the tiled losses' ``value_and_grad`` (dense beside them where it
  fits) at every size and dtype, as a share of the same dtype's :func:`matmul_rate`;
- :func:`check_streamed`: :mod:`experiments.bench_streamed` on one device.

The command, its report and its Markdown are :mod:`experiments.device_check`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments.common.cli import shared_module

LOSS_NAMES = ("infonce", "sigmoid", "decoupled")
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of one check: the full one for a GPU, the reduced one for a CPU."""

    batches: tuple[int, ...]  # loss batch sizes B (pairs), ascending
    dim: int  # embedding width D
    matmul: int  # n of the reference n³ matmul
    repeats: int  # alternating timed rounds per case
    dense_cap_bytes: int | None  # dense only below this (None: the device's free memory)
    plan_model: str  # a CLIP size of contrastive.models.clip
    plan_memory: str  # the planner's per-device limit
    plan_chunk_rows: int  # gradient-cache chunk of the planned step
    plan_probe: tuple[int, int]  # the search's first two batches, in chunks
    streamed: tuple[str, ...]  # flags of experiments.bench_streamed
    streamed_reserve_s: float  # seconds of the budget kept back for the streamed part


FULL = Sizes(
    batches=(16384, 65536, 262144),
    dim=768,
    matmul=8192,
    repeats=3,
    dense_cap_bytes=None,
    plan_model="vit-b-32",
    plan_memory="16GiB",
    plan_chunk_rows=128,
    plan_probe=(2, 8),
    streamed=("--batch", "32768", "--chunk", "4096", "--width", "1024", "--input-dim", "1024",
              "--repeats", "3"),
    streamed_reserve_s=90.0,
)  # fmt: skip
REDUCED = Sizes(
    batches=(256, 1024),
    dim=64,
    matmul=512,
    repeats=2,
    dense_cap_bytes=64 * 2**20,
    plan_model="vit-tiny",
    plan_memory="10MiB",
    plan_chunk_rows=32,
    # Either side of the answer (608 pairs at 10 MiB with jax 0.10): two compiles close the
    # search; with other versions it takes a few more and finds the answer all the same.
    plan_probe=(19, 20),
    streamed=("--batch", "256", "--chunk", "64", "--width", "32", "--input-dim", "16",
              "--repeats", "2"),
    streamed_reserve_s=0.0,
)  # fmt: skip


# ------------------------------------------------------------------------- memory


def _memory_stats(device: Any) -> dict | None:
    """The device's allocator counters, or None where the backend has none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return dict(stats) if stats else None


def check_planner(sizes: Sizes, limit_text: str, device: Any) -> dict:
    """The planned batch of a small CLIP step, its predicted peak, and the measured one.

    Prediction: the planner's step (:func:`experiments.plan.build_step`) on one CPU device
    and its search (:func:`experiments.common.planning.largest_batch`), from XLA:CPU's
    buffer assignment. Measurement: the same step with real parameters and a batch of the
    planned size, compiled for ``device`` and run once; ``peak_bytes_in_use`` of its
    allocator afterwards (the check runs this part first, so that the peak is this step's).
    """
    import jax
    import numpy as np
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.models.clip import clip_config
    from contrastive.step import train_step as ts
    from experiments import plan
    from experiments.common.planning import abstract_clip, largest_batch, parse_bytes

    limit = parse_bytes(limit_text)
    start = time.perf_counter()
    plan_step = plan.build_step(sizes.plan_model, 1, chunk_rows=sizes.plan_chunk_rows)
    # Probes nearer the answer than the command's (64 and 128 chunks): fewer compiles.
    found = largest_batch(plan_step, limit, probe=sizes.plan_probe)
    batch = found["largest_global_batch"]
    out: dict[str, Any] = {
        "model": sizes.plan_model,
        "memory_limit_bytes": limit,
        "chunk_size": plan_step.chunk_size,
        "planned_batch": batch,
        "predicted_peak_bytes": None if batch is None else found["points"][batch]["total_bytes"],
        "planner_compiles": len(found["points"]),
        "planner_points": {str(b): p["total_bytes"] for b, p in sorted(found["points"].items())},
        "planner_s": round(time.perf_counter() - start, 1),
    }
    if batch is None:
        out["note"] = "one chunk does not fit the limit: nothing to run"
        return out

    before = _memory_stats(device)
    mesh = mesh_lib.make_mesh([device])
    abstract = abstract_clip(sizes.plan_model, 1, chunk_rows=sizes.plan_chunk_rows)
    with jax.default_device(device):
        model = models.clip_model(sizes.plan_model, rngs=nnx.Rngs(0))
        graphdef, state = ts.create_train_state(model, abstract.tx)
    del model
    state = ts.place_state(state, mesh)
    step = ts.make_train_step(graphdef, abstract.config, mesh, tx=abstract.tx)
    spec = models.clip_input_spec(sizes.plan_model, batch, mesh_lib.batch_sharding(mesh))
    # Compiled once for the device: its compiler's view of the memory, then the call.
    t0 = time.perf_counter()
    compiled = step.lower(state, spec, None).compile()
    out["device_compiled_bytes"] = _total_bytes(compiled)
    cfg = clip_config(sizes.plan_model)
    rng = np.random.default_rng(0)
    images = np.zeros(spec[0].shape, np.uint8)  # memory does not depend on the pixels
    tokens = rng.integers(0, cfg.vocab_size, spec[1].shape, dtype=np.int32)
    state, metrics = compiled(state, mesh_lib.shard_batch((images, tokens), mesh), None)
    loss = float(jax.device_get(metrics["loss"]))
    out["step_s_with_compile"] = round(time.perf_counter() - t0, 2)
    out["loss_finite"] = bool(np.isfinite(loss))
    after = _memory_stats(device)
    if after is None or "peak_bytes_in_use" not in after:
        out["measured_peak_bytes"] = None
        out["measured"] = "not available (the backend reports no memory_stats())"
    else:
        out["measured_peak_bytes"] = int(after["peak_bytes_in_use"])
        out["in_use_before_bytes"] = int((before or {}).get("bytes_in_use", 0))
        out["bytes_limit"] = int(after.get("bytes_limit", 0)) or None
        out["measured_over_predicted"] = out["measured_peak_bytes"] / out["predicted_peak_bytes"]
        out["measured"] = "memory_stats()['peak_bytes_in_use'] after one step"
    del state, metrics
    return out


# ------------------------------------------------------------------------- losses


def _free_bytes(device: Any) -> int | None:
    stats = _memory_stats(device)
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _total_bytes(compiled: Any) -> int:
    """Temporaries + arguments + outputs − aliased of a compiled program (as the planner
    counts, :func:`experiments.common.benchmarking.compiled_memory`)."""
    m = compiled.memory_analysis()
    return int(
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - getattr(m, "alias_size_in_bytes", 0)
    )


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def matmul_rate(n: int, dtype: Any, repeats: int) -> dict:
    """FLOP/s of a plain jitted ``(n, n) · (n, n)`` matmul in ``dtype`` (median of rounds)."""
    import jax
    import jax.numpy as jnp

    from experiments.common import benchmarking as bm

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: a @ b)  # (n, n) · (n, n) -> (n, n)
    (t,) = bm.median_seconds([mm], a, a, repeats=max(repeats, 5))
    return {"n": n, "seconds": t, "flops_per_s": 2 * n**3 / t, "tflops": 2 * n**3 / t / 1e12}


def time_loss(loss: str, x: Any, y: Any, *, repeats: int, room: int | None) -> dict:
    """One case: the tiled loss's ``value_and_grad`` time and, when its compiled program
    needs at most 80 % of ``room`` bytes, the dense reference's beside it (alternating)."""
    import jax

    from experiments.common import benchmarking as bm

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, y)]
    tiled = bm.loss_grad_fn("tiled", loss, None).lower(*specs).compile()
    row: dict[str, Any] = {"tiled_compiled_bytes": _total_bytes(tiled)}
    fns = [tiled]
    batch = x.shape[0]
    # One float32 B×B logits matrix is the least the dense loss holds: no compile when even
    # that cannot fit; else the compiler's figure decides.
    if room is not None and 4 * batch * batch <= 0.8 * room:
        dense = bm.loss_grad_fn("dense", loss, None).lower(*specs).compile()
        row["dense_compiled_bytes"] = _total_bytes(dense)
        if row["dense_compiled_bytes"] <= 0.8 * room:
            fns.append(dense)
    try:
        times = bm.median_seconds(fns, x, y, repeats=repeats)
    except Exception as e:  # the dense program can still run out of memory: time tiled alone
        if len(fns) == 1 or not _is_oom(e):
            raise
        fns, row["dense"] = fns[:1], "out of memory"
        times = bm.median_seconds(fns, x, y, repeats=repeats)
    row["tiled_s"] = times[0]
    if len(fns) == 2:
        row["dense_s"] = times[1]
    else:
        row.setdefault("dense", "does not fit" if room is not None else "no memory figure")
    return row


def time_losses(sizes: Sizes, device: Any, budget_s: float) -> tuple[dict, list[dict]]:
    """Every (B, dtype, loss): tiled (and dense where it fits) forward + backward times,
    their FLOP rates and their share of the same dtype's matmul rate.

    Rates count matmul FLOPs only: tiled ``8·B²·D`` (forward tile, recomputed tile, dx and
    dy), dense ``6·B²·D`` (logits, dx, dy). A case whose time, extrapolated as ``B²`` from
    the same (dtype, loss) at the previous B, would overrun ``budget_s`` is skipped.
    """
    import jax.numpy as jnp

    from experiments.common import benchmarking as bm

    rates = {d: matmul_rate(sizes.matmul, getattr(jnp, d), sizes.repeats) for d in DTYPES}
    deadline = time.perf_counter() + budget_s
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (dtype, loss) -> (B, case seconds)
    rows = []
    for batch in sizes.batches:
        x32, y32 = bm.unit_embeddings(batch, sizes.dim)
        for dtype in DTYPES:
            x, y = x32.astype(dtype), y32.astype(dtype)
            for loss in LOSS_NAMES:
                row: dict[str, Any] = {"batch": batch, "dim": sizes.dim, "dtype": dtype}
                row["loss"] = loss
                left = deadline - time.perf_counter()
                guess = None
                if (dtype, loss) in last:
                    b0, t0 = last[(dtype, loss)]
                    guess = t0 * (batch / b0) ** 2
                if left <= 0 or (guess is not None and guess > left):
                    row["skipped"] = (
                        f"predicted {guess:.0f} s > {max(left, 0):.0f} s left of --budget-s"
                        if guess is not None
                        else "no time left of --budget-s"
                    )
                    rows.append(row)
                    print(f"B={batch} {dtype} {loss}: skipped ({row['skipped']})", flush=True)
                    continue
                room = sizes.dense_cap_bytes or _free_bytes(device)
                start = time.perf_counter()
                row |= time_loss(loss, x, y, repeats=sizes.repeats, room=room)
                last[(dtype, loss)] = (batch, time.perf_counter() - start)
                flops = bm.matmul_flops(batch, sizes.dim, {})  # 8·B²·D
                peak = rates[dtype]["flops_per_s"]
                row["tiled_tflops"] = flops / row["tiled_s"] / 1e12
                row["tiled_share_of_matmul"] = flops / row["tiled_s"] / peak
                if "dense_s" in row:
                    row["dense_share_of_matmul"] = 0.75 * flops / row["dense_s"] / peak
                    row["tiled_over_dense"] = row["tiled_s"] / row["dense_s"]
                rows.append(row)
                print(
                    f"B={batch} {dtype} {loss}: tiled {row['tiled_s']:.4f} s "
                    f"({100 * row['tiled_share_of_matmul']:.0f}% of matmul), dense "
                    + (f"{row['dense_s']:.4f} s" if "dense_s" in row else row["dense"]),
                    flush=True,
                )
    return rates, rows


# ------------------------------------------------------------------------- streamed


def check_streamed(sizes: Sizes, out: Path) -> dict:
    """:mod:`experiments.bench_streamed` on one device, its files in ``out/streamed``."""
    from experiments import bench_streamed
    from experiments.common.reports import stack_record, write_json

    argv = ["--devices", "1", *sizes.streamed, "--read-latency-ms", "0"]
    summary = bench_streamed.run([*argv, "--out", str(out / "streamed")])
    # Every file of the check says what made it, the benchmark's own record too.
    record = out / "streamed" / f"{bench_streamed.STEM}.json"
    write_json(record, {**json.loads(record.read_text()), "stack": stack_record()})
    return {"flags": argv, "rows": summary["rows"], "target": summary["target"]}


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
