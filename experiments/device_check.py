"""A check of the GPU/TPU claims in a few minutes: loss speed, planner memory, streamed step.

``python -m experiments.device_check`` runs on ``jax.devices()[0]`` and writes one report,
``device_check.{json,md}``, into the run directory it prints. Three measurements, in this
order (the memory one first, while the device's peak-memory counter is still fresh):

1. **Planner against the device** (:mod:`experiments.plan`). The planner sizes the largest
   global batch of a small CLIP train step (gradient-cached, one device) that fits
   ``--plan-memory`` from XLA:CPU's buffer assignment, compile only, exactly as the
   committed plan does. That step is then built for real on the device at the planned
   batch and run once; ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` is the
   measured peak, to set against the predicted per-device bytes (temporaries + arguments
   + outputs − aliased). The device's own compiler's ``memory_analysis()`` of the same
   step is reported beside them. A CPU has no ``memory_stats()``: "not available".
2. **Tiled losses** (:mod:`losses`: infonce, sigmoid, decoupled), ``value_and_grad`` with
   respect to x and y at B up to 262,144 (256k) pairs, D = 768, in bfloat16 and float32.
   Each loss's rate counts the tiled algorithm's matmul FLOPs, ``8·B²·D`` (forward tile,
   recomputed tile, dx and dy products: Inf-CL, Cheng et al. 2024), against a plain
   ``n³`` matmul of the same dtype timed in the same process (``2·n³`` FLOPs): the share
   of the device's matmul rate. The dense reference (``losses.reference``, ``6·B²·D``)
   runs beside it where its compiled program fits the device's free memory. A case whose
   time, extrapolated as ``B²`` from the previous size, would not fit what is left of
   the check's ``--budget-s`` (less a reserve for part 3) is skipped and says so.
3. **Streamed against in-memory step** (:mod:`experiments.bench_streamed`: the gradient
   cache of Gao et al. 2021 reading each chunk from host arrays twice, prefetch on and
   off, against the step given the whole batch), the median seconds and their ratio.

On a CPU (or with ``--reduced``) every size shrinks so that the whole check runs in well
under a minute; that is what CI runs. On one H100 the full size takes about 5 minutes
(``--budget-s``, default 450 s, bounds the whole check: the loss part gets what the
planner left, less a reserve for the streamed part).

    python -m experiments.device_check                  # full size on a GPU, reduced on CPU
    python -m experiments.device_check --reduced --out /tmp/dc

Every report records the package versions and the machine
(:func:`experiments.common.reports.stack_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.common import run_dir
from experiments.common.cli import command_parser, positive_float, run_main

STEM = "device_check"
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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(f"python -m experiments.{STEM}", __doc__)
    p.add_argument(
        "--reduced",
        action="store_true",
        help="the CPU size (automatic when the default backend is the CPU)",
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=450.0,
        help="seconds for the whole check: a loss case that would overrun it (less a reserve "
        "for the streamed part) is skipped",
    )
    p.add_argument(
        "--plan-memory", default=None, help="the planner's per-device limit (default: per size)"
    )
    run_dir.add_output_flags(p)
    return p.parse_args(argv)


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


# ------------------------------------------------------------------------- report


def _bytes(n: float | None) -> str:
    from experiments.common.benchmarking import fmt_bytes

    return fmt_bytes(n)


def _planner_md(p: dict) -> list[str]:
    lines = [
        f"{p['model']}, gradient-cached train step (chunk {p['chunk_size']}), one device, "
        f"limit {_bytes(p['memory_limit_bytes'])}: planned global batch {p['planned_batch']} "
        f"({p['planner_compiles']} compiles, {p['planner_s']} s).",
    ]
    if p["planned_batch"] is None:
        return [*lines, "", p.get("note", "")]
    measured, ratio = p.get("measured_peak_bytes"), p.get("measured_over_predicted")
    return [
        *lines,
        "",
        "| predicted peak (XLA:CPU, planner) | device compiler's total | measured peak "
        "(memory_stats) | measured / predicted | loss finite |",
        "|---:|---:|---:|---:|---|",
        f"| {_bytes(p['predicted_peak_bytes'])} | {_bytes(p.get('device_compiled_bytes'))} | "
        + (_bytes(measured) if measured is not None else "not available")
        + f" | {'-' if ratio is None else f'{ratio:.2f}'} | {p.get('loss_finite')} |",
    ]


def _losses_md(matmul: dict, rows: list[dict]) -> list[str]:
    lines = [
        "Matmul rate in this process: "
        + "; ".join(f"{d} {r['tflops']:.3g} TFLOP/s ({r['n']}³)" for d, r in matmul.items())
        + ". Share = the loss's matmul FLOPs per second (tiled 8·B²·D, dense 6·B²·D) over "
        "the rate of the same dtype.",
        "",
        "| B | D | dtype | loss | tiled s | tiled TFLOP/s | tiled share | dense s "
        "| dense share | tiled/dense |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['batch']} | {r['dim']} | {r['dtype']} | {r['loss']} |"
        if "skipped" in r:
            lines.append(head + f" skipped: {r['skipped']} | | | | | |")
            continue
        dense = (
            [f"{r['dense_s']:.4f}", f"{100 * r['dense_share_of_matmul']:.0f}%",
             f"{r['tiled_over_dense']:.2f}"]
            if "dense_s" in r
            else [r["dense"], "-", "-"]
        )  # fmt: skip
        lines.append(
            head
            + f" {r['tiled_s']:.4f} | {r['tiled_tflops']:.3g} | "
            + f"{100 * r['tiled_share_of_matmul']:.0f}% | "
            + " | ".join(dense)
            + " |"
        )
    return lines


def _streamed_md(st: dict) -> list[str]:
    lines = [
        f"`python -m experiments.bench_streamed {' '.join(st['flags'])}`",
        "",
        "| step | median s | vs in-memory |",
        "|---|---:|---:|",
    ]
    for r in st["rows"]:
        lines.append(f"| {r['step']} | {r['median_s']:.4f} | {r['vs_in_memory']:.2f} |")
    t = st["target"]
    verdict = "met" if t["met"] else "not met"
    return [
        *lines,
        "",
        f"Target (issue 19): streamed with prefetch at most "
        f"{t['streamed_over_in_memory_at_most']}x the in-memory step: {t['ratio']:.2f}x, "
        f"{verdict}.",
    ]


def markdown(report: dict) -> str:
    """The report as Markdown: the machine, then one section per measurement (or the one
    line of the error that stopped it)."""
    s = report["stack"]
    packages = ", ".join(f"{k} {v}" for k, v in s["packages"].items() if v)
    lines = [
        f"# Device check ({'reduced' if report['reduced'] else 'full'} size)",
        "",
        f"Device: {s.get('device_kind')} ({s.get('backend')}, {s.get('device_count')} "
        f"device(s)); CPU: {s['cpu']} ({s['cpu_count']} cores); Python {s['python']}; "
        f"{packages}. Took {report['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in report['section_seconds'].items())}).",
    ]
    parts = {
        "planner": ("Planner against the device", lambda: _planner_md(report["planner"])),
        "losses": (
            "Tiled losses, forward + backward",
            lambda: _losses_md(report["matmul"], report["losses"]),
        ),
        "streamed": ("Streamed step against the in-memory one",
                     lambda: _streamed_md(report["streamed"])),
    }  # fmt: skip
    for name, (title, body) in parts.items():
        lines += ["", f"## {title}", ""]
        if name in report["errors"]:
            lines.append(f"Failed: {report['errors'][name]}")
        else:
            lines += body()
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    from experiments.common.planning import parse_bytes

    if args.plan_memory is not None:  # a bad size is one line, before any work
        try:
            parse_bytes(args.plan_memory)
        except ValueError as e:
            raise ValueError(str(e).replace("--memory", "--plan-memory", 1)) from None
    out = run_dir.create(STEM, args.out)
    start = time.perf_counter()

    import jax

    from experiments.common.reports import stack_record, write_json

    device = jax.devices()[0]
    reduced = args.reduced or device.platform == "cpu"
    sizes = REDUCED if reduced else FULL
    print(f"device check on {device.device_kind} ({'reduced' if reduced else 'full'} size)")
    report: dict[str, Any] = {
        "command": " ".join([f"python -m experiments.{STEM}", *(argv or sys.argv[1:])]),
        "reduced": reduced,
        "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))),  # as the file has them
        "stack": stack_record(),
    }
    sections = {
        "planner": lambda: check_planner(sizes, args.plan_memory or sizes.plan_memory, device),
        "losses": lambda: time_losses(
            sizes, device, args.budget_s - sizes.streamed_reserve_s - (time.perf_counter() - start)
        ),
        "streamed": lambda: check_streamed(sizes, out),
    }
    report["section_seconds"], report["section_cpu_seconds"], report["errors"] = {}, {}, {}
    for name, fn in sections.items():
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = fn()
        except Exception as e:  # one failed part must not cost the others on a borrowed GPU
            traceback.print_exc()
            report["errors"][name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            result = None
        report["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        report["section_cpu_seconds"][name] = round(time.process_time() - c0, 1)
        if name == "losses":
            report["matmul"], report["losses"] = result or ({}, [])
        else:
            report[name] = result
        print(f"{name}: {report['section_seconds'][name]} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = markdown(report)
    write_json(out / f"{STEM}.json", report)
    (out / f"{STEM}.md").write_text(text)
    print(text)
    if args.update_results:
        run_dir.publish(out, [f"{STEM}.json", f"{STEM}.md"])
    print(f"run directory: {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
