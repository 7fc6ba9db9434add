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

Writes ``bench_ring.{json,md}`` into a run directory (``--out``, default
``runs/bench_ring-<time>/``; ``--update-results`` also refreshes ``experiments/results/``)
and prints the table. The two methods are timed in alternation (``benchmarking``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive.loss_registry import LOSS_NAMES
from experiments.common import benchmarking as bm
from experiments.common import run_dir
from experiments.common.cli import command_parser, positive_int, run_main

STEM = "bench_ring"
METHODS = ("ring", "gathered")


def _num(v: float) -> str:
    """Three significant figures, without exponents: 3.22, 412, 6,760,000."""
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def run(argv: Sequence[str] | None = None) -> list[dict]:
    p = command_parser("python -m experiments.bench_ring", __doc__)
    p.add_argument("--time-batch", type=positive_int, nargs="*", default=[2048, 4096],
                   help="global batch sizes that are timed (and measured)")  # fmt: skip
    p.add_argument("--memory-batch", type=positive_int, nargs="*",
                   default=[4096, 16384, 65536, 262144, 1048576],
                   help="global batch sizes whose memory is measured (compile only)")  # fmt: skip
    p.add_argument("--dim", type=positive_int, default=768, help="embedding dimension D")
    p.add_argument("--loss", default="infonce", choices=LOSS_NAMES, help="the loss compared")
    p.add_argument("--devices", type=positive_int, default=8,
                   help="devices of the ring (simulated CPU devices)")  # fmt: skip
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="tile edge (default: the loss's own)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per method; the median is reported")  # fmt: skip
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    batches = sorted(set(args.time_batch) | set(args.memory_batch))
    if not any(b % args.devices == 0 for b in batches):
        raise ValueError(
            f"no batch size of --time-batch {args.time_batch} and --memory-batch "
            f"{args.memory_batch} is a multiple of --devices {args.devices}: give at least one"
        )
    bm.simulate_cpu_devices(args.devices)  # before the first jax operation
    from contrastive.mesh import make_mesh

    t_start = time.perf_counter()
    out = run_dir.create(STEM, args.out)
    mesh = make_mesh(num_devices=args.devices)
    rows_sharding = NamedSharding(mesh, P("data"))
    n = args.devices
    platform = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    print(f"{platform}, jax {jax.__version__}, {n}-device mesh, D = {args.dim}", flush=True)
    fns = [bm.loss_grad_fn(name, args.loss, mesh, args.block_size) for name in METHODS]
    rows = []
    for batch in batches:
        if batch % n:
            print(f"skip B={batch}: not a multiple of {n} devices", flush=True)
            continue
        row = {"batch": batch, "dim": args.dim, "loss": args.loss, "devices": n}
        spec = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=rows_sharding)
        seconds = [None, None]
        if batch in args.time_batch:  # alternating rounds: load hits both alike
            xy = bm.unit_embeddings(batch, args.dim, rows_sharding)
            seconds = bm.median_seconds(fns, *xy, repeats=args.repeats)
        for name, fn, s in zip(METHODS, fns, seconds, strict=True):
            r = bm.compiled_memory(fn, spec, spec)
            row[f"{name}_temp_bytes"] = r["temp_bytes"]
            row[f"{name}_total_bytes"] = r["total_bytes"]
            row[f"{name}_s"] = s
        flops = bm.matmul_flops(batch, args.dim, {})  # the whole loss's tile matmuls
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
            f"B={batch:>9,} temp ring {bm.fmt_bytes(row['ring_temp_bytes'])}, gathered "
            f"{bm.fmt_bytes(row['gathered_temp_bytes'])} (x{row['temp_ratio']:.1f}); total "
            f"{bm.fmt_bytes(row['ring_total_bytes'])} vs "
            f"{bm.fmt_bytes(row['gathered_total_bytes'])}{t}",
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
            f"| {bm.fmt_batch(r['batch'])} | {bm.fmt_bytes(r['ring_temp_bytes'])} | "
            f"{bm.fmt_bytes(r['gathered_temp_bytes'])} | {r['temp_ratio']:.1f}× | "
            f"{bm.fmt_bytes(r['ring_total_bytes'])} | {bm.fmt_bytes(r['gathered_total_bytes'])} "
            f"| {r['total_ratio']:.1f}× | {_num(r['ring_gflop_per_device'])} / "
            f"{_num(r['gathered_gflop_per_device'])} | "
            + (
                f"{r['ring_s']:.3f} | {r['gathered_s']:.3f} | {r['time_ratio']:.2f}× |"
                if timed
                else "- | - | - |"
            )
        )
    md = "\n".join(lines) + "\n"
    meta = {
        "platform": platform,
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - t_start, 1),
        "config": vars(args),
    }
    print(md)
    texts = {f"{STEM}.json": json.dumps({"meta": meta, "rows": rows}, indent=1), f"{STEM}.md": md}
    bm.save_outputs(out, texts, update_results=args.update_results)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
