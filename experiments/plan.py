"""The largest global batch of a CLIP train step that fits a per-device memory limit.

Compile only, nothing runs and nothing is allocated: the full train step of
``contrastive.step.train_step`` (the named two-tower CLIP model of ``contrastive.models``,
bfloat16 compute with float32 parameters, AdamW, the ring InfoNCE loss, gradient caching
or not) is lowered with ``jax.ShapeDtypeStruct`` inputs on ``--devices`` simulated CPU
devices, and XLA's memory analysis of the partitioned program gives the bytes one device
holds (counted as in :func:`experiments.benchmarking.compiled_memory`):

    per-device bytes = temporaries + arguments + outputs − aliased

- arguments: the replicated train state (parameters, AdamW moments, step) and the device's
  rows of the batch; outputs: the new state and the metrics; aliased: the new state is
  written into the donated old state's buffers, so it is counted once;
- temporaries: everything else XLA allocates: activations of a chunk (or of the whole
  local batch without gradient caching), parameter gradients and their accumulator, the
  embeddings and their gradients, the ring loss's buffers.

The batch is ``(images, tokens)``: uint8 images (B, 224, 224, 3), normalised inside the
model as CLIP feeds decoded images (150,528 bytes per example; float32 would be 4x), and
int32 tokens (B, 77) (308 bytes).

Search. At a fixed chunk the bytes are affine in the batch, ``a + s·B``: two compiles give
``a`` and ``s`` and the limit gives a first guess; then secant steps and bisection between
measured batches close the bracket until the largest multiple of the quantum that fits is
next to one that does not (usually 2-4 more compiles). The quantum is the global chunk
(``--chunk-rows`` per device times the devices) with gradient caching, so that no ragged
tail chunk is compiled, and one row per device without.

    python -m experiments.plan --model vit-l-14 --devices 8 --memory 80GiB
    python -m experiments.plan --models vit-b-32,vit-b-16,vit-l-14 --devices 8,32,256 \\
        --update-results

Prints one JSON line per (model, devices, step) and, last, the JSON line of the first
model, devices and step kind (gradient-cached unless ``--plain``)::

    {"model": "vit-l-14", "devices": 8, "memory_limit_bytes": 85899345920,
     "largest_global_batch": ..., "per_device_bytes": ..., "chunk_size": ...}

The streamed step (``--stream``, :mod:`experiments.common.streamed_plan`): the raw batch
never exists whole, each chunk is read from the host twice; per device, the peak over the
step's phases of its compiled programs plus the buffers resident between them (embeddings,
their gradients, the ring's buffers, the accumulator, parameters and AdamW state), and the
host's two chunks of raw inputs; each row names its limiting buffer and bytes per pair::

    python -m experiments.plan --stream --models vit-b-32,vit-b-16,vit-l-14 \
        --devices 8,32,256

Writes ``plan.{json,md}`` (``plan_streamed.{json,md}`` with ``--stream``) to the run
directory (``experiments/common/run_dir.py``). XLA:CPU's
buffer assignment stands in for the accelerator's: fusion and library workspaces differ
on GPU/TPU, how memory scales with the batch does not.

Reference: Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size
Scaling for Contrastive Loss" (Inf-CL): ViT-L/14 with 4,096k pairs on
8 A800 (80 GB) and 12,288k on 32, with CPU offload of the data; Gao et al. 2021
(GradCache); Radford et al. 2021 (CLIP).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from contrastive.models.clip import CLIP_CONFIGS
from experiments.common import run_dir
from experiments.common import streamed_plan as streamed
from experiments.common.cli import OneLineParser, existing_file, positive_int, run_main

# The search and the byte sizes live in experiments/common/planning.py (the streamed plan
# shares them); their names stay importable from here.
from experiments.common.planning import (  # noqa: F401
    INF_CL,
    StepPlan,
    abstract_clip,
    affine_fit,
    int_list,
    largest_batch,
    parse_bytes,
)

MODELS = tuple(CLIP_CONFIGS)
# Rows per device in one gradient-cache chunk: activations of a chunk are a few GiB at
# most (ViT-L/14 without remat: ~0.3 GiB per row), small beside what 80 GiB holds of
# batch, while a chunk keeps a GPU's matmuls large (32 x 257 tokens for ViT-L/14).
CHUNK_ROWS = {"vit-b-32": 128, "vit-b-16": 32, "vit-l-14": 16, "vit-tiny": 32}
STEM = "plan"


def build_step(
    model: str,
    devices: int,
    *,
    chunk_rows: int | None,
    remat: bool = False,
    shard_optimizer: bool = False,
) -> StepPlan:
    """The compile-only in-memory train step of ``model`` on the first ``devices`` CPU
    devices (:func:`experiments.common.planning.abstract_clip`: nothing allocated).
    ``chunk_rows`` is the gradient-cache chunk per device (None: the plain step)."""
    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.step import train_step as ts
    from experiments.common import benchmarking as bm

    s = abstract_clip(
        model, devices, chunk_rows=chunk_rows, remat=remat, shard_optimizer=shard_optimizer
    )
    step = ts.make_train_step(s.graphdef, s.config, s.mesh, tx=s.tx)
    rows = mesh_lib.batch_sharding(s.mesh)

    def measure(batch: int) -> dict:
        return bm.compiled_memory(step, s.state, models.clip_input_spec(model, batch, rows), None)

    chunk = s.config.chunk_size
    return StepPlan(model, devices, chunk, remat, measure, chunk or devices)


def plan_one(
    model: str,
    devices: int,
    limit: int,
    *,
    chunk_rows: int | None,
    remat: bool,
    shard_optimizer: bool = False,
    seed: tuple[float, float] | None = None,
) -> dict:
    """Build, search and summarise one (model, devices, step) as the result record."""
    start = time.perf_counter()
    plan = build_step(
        model, devices, chunk_rows=chunk_rows, remat=remat, shard_optimizer=shard_optimizer
    )
    found = largest_batch(plan, limit, seed=seed)
    best = found["largest_global_batch"]
    at = found["points"].get(best, {})
    above = found["points"].get(None if best is None else best + plan.quantum, {})
    return {
        "model": model,
        "devices": devices,
        "memory_limit_bytes": limit,
        "largest_global_batch": best,
        "per_device_bytes": at.get("total_bytes"),
        "chunk_size": plan.chunk_size,
        "step": "cached" if plan.chunk_size else "plain",
        "remat": remat,
        "quantum": plan.quantum,
        "next_batch_bytes": above.get("total_bytes"),
        "breakdown_bytes": {
            k: at.get(k) for k in ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes")
        },  # fmt: skip
        "compiles": len(found["points"]),
        "seconds": round(time.perf_counter() - start, 1),
        "points": {str(b): p["total_bytes"] for b, p in sorted(found["points"].items())},
        "affine_fit": affine_fit(found["points"], devices, limit),
    }


def read_records(path: str) -> list[dict]:
    """The records of an earlier run's ``plan.json``; ValueError (one line) if it is not one."""
    try:
        records = json.loads(Path(path).read_text())["records"]
        keys = {"model", "devices", "step"}
        if not isinstance(records, list) or not all(keys <= set(r) for r in records):
            raise ValueError("records without model, devices and step")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--from-records {path}: not the plan.json of an earlier run ({why})"
        ) from None
    return records


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m experiments.plan",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--models", default=None,
                   help="comma-separated models (the table mode), of the above")  # fmt: skip
    p.add_argument("--devices", default="8", help="simulated devices, e.g. 8 or 8,32,256")
    p.add_argument("--memory", default="80GiB", help="per-device memory limit, e.g. 80GiB")
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=None,
        help="gradient-cache chunk rows per device (default: per model, "
        + ", ".join(f"{k} {v}" for k, v in CHUNK_ROWS.items())
        + ")",
    )
    p.add_argument("--plain", action="store_true", help="size only the plain (uncached) step")
    p.add_argument("--cached-only", action="store_true", help="skip the plain step")
    p.add_argument("--remat", action="store_true", help="jax.checkpoint every layer")
    p.add_argument(
        "--stream",
        action="store_true",
        help="size the streamed step (contrastive.step.streamed.step: raw inputs read from the "
        f"host chunk by chunk) instead; writes {streamed.STEM}.{{json,md}}",
    )
    p.add_argument(
        "--from-records",
        type=existing_file,
        nargs="+",
        default=None,
        metavar="PLAN_JSON",
        help="compile nothing: rebuild the table from the plan.json files of earlier runs",
    )
    p.add_argument(
        "--shard-optimizer",
        action="store_true",
        help="shard the optimiser state along the data axis (TrainConfig.shard_optimizer)",
    )
    run_dir.add_output_flags(p)
    return p


def markdown(records: list[dict], limit: int) -> str:
    """The results table: largest global batch per model and device count."""
    from experiments.common.benchmarking import fmt_bytes

    devices = sorted({r["devices"] for r in records})
    models = list(dict.fromkeys(r["model"] for r in records))
    by = {(r["model"], r["devices"], r["step"]): r for r in records}

    def cell(r):
        if r is None:
            return ""
        if r["largest_global_batch"] is None:
            return "does not fit"
        return f"{r['largest_global_batch']:,} ({fmt_bytes(r['per_device_bytes'])})"

    lines = [
        f"Largest global batch whose per-device memory (temporaries + arguments + outputs − "
        f"aliased, XLA:CPU buffer assignment, compile only) fits {fmt_bytes(limit)}: CLIP "
        "two-tower models, bf16 compute, f32 parameters, AdamW, ring InfoNCE; uint8 images "
        "and int32 tokens; cached = gradient cache with the chunk given, plain = no cache. "
        "In brackets: per-device bytes at that batch.",
        "",
        "| model | step | " + " | ".join(f"{n} devices" for n in devices) + " |",
        "|---|---|" + "---|" * len(devices),
    ]
    for m in models:
        for step in ("cached", "plain"):
            rs = [by.get((m, n, step)) for n in devices]
            if not any(rs):
                continue
            chunk = {r["chunk_size"] // r["devices"] for r in rs if r and r["chunk_size"]}
            label = step + (f" (chunk {chunk.pop()}/device)" if len(chunk) == 1 else "")
            lines.append(f"| {m} | {label} | " + " | ".join(cell(r) for r in rs) + " |")
    if any(n in INF_CL for n in devices):
        lines.append(
            "| vit-l-14, Inf-CL (8/32 × A800, CPU offload) | tiled + offload | "
            + " | ".join(INF_CL.get(n, "") for n in devices)
            + " |"
        )
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    models = [args.model] if args.model else []
    listed = [m for m in (args.models or "").split(",") if m]
    for flag, names in (("--model", models), ("--models", listed)):
        for m in names:
            if m not in MODELS:
                raise ValueError(f"{flag} {m!r}: choose one of {', '.join(MODELS)}")
    if args.models is not None and not listed:
        raise ValueError(f"--models {args.models!r}: give comma-separated models such as vit-b-32")
    models = [*models, *listed] or ["vit-l-14"]
    devices = int_list(args.devices, "--devices")
    limit = parse_bytes(args.memory)
    if args.plain and args.cached_only:
        raise ValueError("--plain and --cached-only exclude each other; pass one")
    if args.stream and (args.plain or args.cached_only):
        raise ValueError("--stream sizes the streamed step only: drop --plain and --cached-only")
    steps = ["plain"] if args.plain else ["cached"] if args.cached_only else ["cached", "plain"]
    steps = [streamed.STEP] if args.stream else steps
    stem = streamed.STEM if args.stream else STEM

    if args.from_records:
        records = [r for f in args.from_records for r in read_records(f)]
        keep = lambda r: r["model"] in models and r["devices"] in devices and r["step"] in steps
        records = [r for r in records if keep(r)]
        if not records:
            raise ValueError("no records for these --models and --devices in --from-records")
        out = run_dir.create(stem, args.out)
        return _report(records, limit, out, args.update_results, models, devices, steps)

    out = run_dir.create(stem, args.out)

    from experiments.common import benchmarking as bm

    bm.simulate_cpu_devices(max(devices), compile_only=True)  # before any jax operation
    records = []
    for m in models:
        for step in steps:
            seed = None  # the affine fit of the previous device count seeds the next
            for n in devices:
                rows = (args.chunk_rows or CHUNK_ROWS[m]) if step != "plain" else None
                size = streamed.plan_streamed if step == streamed.STEP else plan_one
                r = size(
                    m, n, limit, chunk_rows=rows, remat=args.remat,
                    shard_optimizer=args.shard_optimizer, seed=seed,
                )  # fmt: skip
                seed = r["affine_fit"] if r["largest_global_batch"] else None
                records.append(r)
                print(json.dumps(r), flush=True)
    return _report(records, limit, out, args.update_results, models, devices, steps)


def _report(
    records: list[dict],
    limit: int,
    out: Path,
    update_results: bool,
    models: list[str],
    devices: list[int],
    steps: list[str],
) -> dict:
    """Write plan[_streamed].{json,md}, print the table, and last the JSON line of the first
    record."""
    from experiments.common.benchmarking import save_outputs

    stem, table_of = (streamed.STEM, streamed.markdown) if steps == [streamed.STEP] else (
        STEM, markdown)  # fmt: skip

    if not records:
        raise ValueError("no records for these --models and --devices in --from-records")
    records.sort(
        key=lambda r: (
            models.index(r["model"]),
            devices.index(r["devices"]),
            steps.index(r["step"]),
        )
    )
    table = table_of(records, limit)
    print(table)
    texts = {f"{stem}.json": json.dumps({"records": records}, indent=1), f"{stem}.md": table}
    save_outputs(out, texts, update_results=update_results)
    first = records[0]
    keys = ("model", "devices", "memory_limit_bytes", "largest_global_batch")
    final = {k: first[k] for k in keys}
    final |= {"per_device_bytes": first.get("per_device_bytes"), "chunk_size": first["chunk_size"]}
    if first["step"] == streamed.STEP:
        keys = ("peak_phase", "limiting_buffer", "bytes_per_pair", "host_bytes_per_device")
        final |= {k: first.get(k) for k in keys}
        print(json.dumps(final), flush=True)
        return final
    final |= {"plain_largest_global_batch": next(
        (r["largest_global_batch"] for r in records if r["step"] == "plain"
         and (r["model"], r["devices"]) == (first["model"], first["devices"])), None)}  # fmt: skip
    print(json.dumps(final), flush=True)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
