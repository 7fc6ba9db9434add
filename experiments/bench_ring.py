"""Ring vs all-gather: per-device memory and time, side by side in one process (issue #3).

Both compute the exact global loss and gradients on ``--devices`` devices (8 simulated CPU
devices by default) from ``(B, D)`` embeddings sharded over ``"data"``:

- ``ring``: ``losses.sharded(losses.<loss>, mesh, "data")``; ``y`` blocks travel around the
  ring with ``ppermute``, each device computes ``B²/n`` similarities and holds ``O(B/n · D)``.
- ``gathered``: ``losses.gathered`` inside ``shard_map``; every device all-gathers ``x`` and
  ``y`` and runs the tiled loss on the whole batch (``B²`` similarities, ``O(B · D)`` held).

Memory is compile only (``jax.ShapeDtypeStruct`` inputs, nothing allocated), so it goes to a
million pairs; time is the median of ``--repeats`` runs of ``value_and_grad`` where it is
quick. On simulated devices all "devices" share the host's cores, so the time ratio is a
ratio of total work (about n×, the gathered version repeats the whole loss on every device)
plus collective overheads, not a measurement of GPU/TPU overlap.

    python -m experiments.bench_ring                     # time B = 2k, 4k; memory to 1M; D = 768
    python -m experiments.bench_ring --time-batch 4096 16384 --memory-batch 65536 4194304

Writes ``bench_ring.{json,md}`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax

# sweep_memory sets XLA_FLAGS (8 host devices) on import, before any backend starts.
from experiments import sweep_memory as sm
from experiments.bench_losses import matmul_flops

STEM = "bench_ring"


def _num(v: float) -> str:
    """Three significant figures, without exponents: 3.22, 412, 6,760,000."""
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time-batch", type=int, nargs="*", default=[2048, 4096])
    p.add_argument(
        "--memory-batch", type=int, nargs="*", default=[4096, 16384, 65536, 262144, 1048576]
    )
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--loss", default="infonce", choices=sm.LOSSES)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=sm.RESULTS, help="output directory")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    mesh = sm.data_mesh(args.devices)
    n = args.devices
    platform = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    print(f"{platform}, jax {jax.__version__}, {n}-device mesh, D = {args.dim}", flush=True)
    methods = {
        name: sm.loss_method(name, args.loss, args.dim, mesh, args.block_size, args.repeats)
        for name in ("ring", "gathered")
    }
    rows = []
    for batch in sorted(set(args.time_batch) | set(args.memory_batch)):
        if batch % n:
            print(f"skip B={batch}: not a multiple of {n} devices", flush=True)
            continue
        row = {"batch": batch, "dim": args.dim, "loss": args.loss, "devices": n}
        for name, m in methods.items():
            r = sm.memory(*m.lower_args(batch))
            row[f"{name}_temp_bytes"] = r["temp_bytes"]
            row[f"{name}_total_bytes"] = r["total_bytes"]
            row[f"{name}_s"] = m.run(batch) if batch in args.time_batch else None
        flops = matmul_flops(batch, args.dim, {})  # the whole loss's tile matmuls
        row["ring_gflop_per_device"] = flops / n / 1e9
        row["gathered_gflop_per_device"] = flops / 1e9
        row["temp_ratio"] = row["gathered_temp_bytes"] / max(row["ring_temp_bytes"], 1)
        row["total_ratio"] = row["gathered_total_bytes"] / max(row["ring_total_bytes"], 1)
        row["time_ratio"] = row["gathered_s"] / row["ring_s"] if row["ring_s"] is not None else None
        rows.append(row)
        t = (
            ""
            if row["ring_s"] is None
            else f" | time ring {row['ring_s']:.3f} s, gathered {row['gathered_s']:.3f} s "
            f"(x{row['time_ratio']:.2f})"
        )
        print(
            f"B={batch:>9,} temp ring {sm.fmt_bytes(row['ring_temp_bytes'])}, gathered "
            f"{sm.fmt_bytes(row['gathered_temp_bytes'])} (x{row['temp_ratio']:.1f}); total "
            f"{sm.fmt_bytes(row['ring_total_bytes'])} vs "
            f"{sm.fmt_bytes(row['gathered_total_bytes'])}{t}",
            flush=True,
        )

    lines = [
        f"Ring vs all-gather, `{args.loss}`, D = {args.dim}, float32, {n} devices "
        f"({platform}, jax {jax.__version__}). Memory: per device, compile only "
        f"(`temp_size_in_bytes`; total adds inputs and outputs). Time: median of "
        f"{args.repeats} runs of `value_and_grad` w.r.t. x and y; the simulated devices share "
        "the host's cores, so it measures total work, not overlap.",
        "",
        "| B | ring temp | gathered temp | gathered/ring | ring total | gathered total "
        "| gathered/ring | matmul GFLOP/device ring / gathered | ring s | gathered s "
        "| gathered/ring |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timed = r["ring_s"] is not None
        lines.append(
            f"| {sm.fmt_batch(r['batch'])} | {sm.fmt_bytes(r['ring_temp_bytes'])} | "
            f"{sm.fmt_bytes(r['gathered_temp_bytes'])} | {r['temp_ratio']:.1f}× | "
            f"{sm.fmt_bytes(r['ring_total_bytes'])} | {sm.fmt_bytes(r['gathered_total_bytes'])} "
            f"| {r['total_ratio']:.1f}× | {_num(r['ring_gflop_per_device'])} / "
            f"{_num(r['gathered_gflop_per_device'])} | "
            + (
                f"{r['ring_s']:.3f} | {r['gathered_s']:.3f} | {r['time_ratio']:.2f}× |"
                if timed
                else "- | - | - |"
            )
        )
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / STEM
    meta = {
        "platform": platform,
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - t_start, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out}.{{json,md}} in {meta['seconds']} s")
    return rows


if __name__ == "__main__":
    main()
