"""Balanced k-means on the device: time per Lloyd iteration, total time, compiled memory.

Clusters ``--points`` random unit vectors of ``--dim`` dimensions into groups of
``--cluster-size`` with :func:`contrastive.inputs.clustering.balanced_clusters` (k-means with
``k = ceil(N / c)``, then the balanced cut), the refresh step of NGAME-style hard-batch
sampling (Dahiya et al. 2023). Reports:

- the median wall time of one Lloyd iteration (:func:`contrastive.inputs.clustering.kmeans_step`,
  ``2·N·k·D`` multiply-adds: the chunked assignment matmul and the one-hot segment sum),
  over ``--iterations`` iterations run one by one;
- the total wall time of the whole ``balanced_clusters`` call (compiled beforehand; the
  compile time is reported apart);
- the compiled temporary memory (``memory_analysis().temp_size_in_bytes``, compile only) of
  one iteration and of the whole call, next to the ``4·N·k`` bytes an unchunked similarity
  matrix would take and to the chunked algorithm's bound ``4·(2·c·k + 3·k·D + 2·c·D + 8·N)``
  bytes (``c`` the chunk: its similarity block and one-hot, the centroids and sums, the
  chunk, per-point assignment, similarity and sort buffers), so the whole call holds
  ``O(N·D + k·D + c·k)``: the points, the centroids, one block; never ``N × k``.

    python -m experiments.bench_clustering                      # a toy size, seconds on a CPU
    python -m experiments.bench_clustering --points 1048576 --dim 256 --cluster-size 256 \\
        --iterations 5                                          # the issue's size (an accelerator)
    python -m experiments.bench_clustering --points 1048576 --dim 256 --memory-only

Writes ``bench_clustering.json`` into a run directory (``--out``, default
``runs/bench_clustering-<time>/``) and prints its path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

from experiments.common import run_dir
from experiments.common.cli import command_parser, nonnegative_int, positive_int, run_main

STEM = "bench_clustering"


def _parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.bench_clustering", __doc__)
    p.add_argument("--points", type=positive_int, default=16384, help="N, points to cluster")
    p.add_argument("--dim", type=positive_int, default=64, help="D, embedding dimension")
    p.add_argument(
        "--cluster-size", type=positive_int, default=64, help="c, points per group; k = ceil(N/c)"
    )
    p.add_argument(
        "--iterations", type=positive_int, default=5, help="Lloyd iterations, timed one by one"
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=4096,
        help="points assigned at once (a 4·c·k-byte similarity block)",
    )
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the points and of k-means"
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only compile and report memory (nothing allocated): sizes this host cannot run",
    )
    run_dir.add_output_flags(p)
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    """The benchmark's body: parse, check, measure, write; returns the result row."""
    args = _parser().parse_args(argv)
    if args.cluster_size > args.points:
        raise ValueError(
            f"--cluster-size {args.cluster_size} exceeds --points {args.points}: "
            f"use at most {args.points}"
        )

    import jax
    import jax.numpy as jnp

    from contrastive.inputs.clustering import balanced_clusters, kmeans, kmeans_step
    from experiments.common import benchmarking as bm

    n, d, c = args.points, args.dim, args.cluster_size
    k = -(-n // c)
    chunk = min(args.chunk_size, n)
    out = run_dir.create(STEM, args.out)
    device = jax.devices()[0]
    platform = f"{device.platform} ({device.device_kind})"
    print(f"{platform}, jax {jax.__version__}: N = {n:,}, D = {d}, c = {c}, k = {k:,}", flush=True)

    key = jax.random.key(args.seed)
    step = jax.jit(lambda x, mu: kmeans_step(x, mu, chunk_size=chunk))
    whole = jax.jit(
        lambda x: balanced_clusters(
            x, cluster_size=c, iterations=args.iterations, key=key, chunk_size=chunk
        )
    )
    points_spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
    memory = {
        "step": bm.compiled_memory(step, points_spec, jax.ShapeDtypeStruct((k, d), jnp.float32)),
        "balanced_clusters": bm.compiled_memory(whole, points_spec),
    }
    row = {
        "points": n,
        "dim": d,
        "cluster_size": c,
        "clusters": k,
        "chunk_size": chunk,
        "iterations": args.iterations,
        "dense_similarity_bytes": 4 * n * k,
        "points_bytes": 4 * n * d,
        "temp_bound_bytes": 4 * (2 * chunk * k + 3 * k * d + 2 * chunk * d + 8 * n),
        "step_temp_bytes": memory["step"]["temp_bytes"],
        "balanced_temp_bytes": memory["balanced_clusters"]["temp_bytes"],
        "compile_s": memory["balanced_clusters"]["compile_s"],
    }
    print(
        f"compiled temp memory: one iteration {bm.fmt_bytes(row['step_temp_bytes'])}, "
        f"balanced_clusters {bm.fmt_bytes(row['balanced_temp_bytes'])} (bound "
        f"{bm.fmt_bytes(row['temp_bound_bytes'])}; the points {bm.fmt_bytes(row['points_bytes'])}"
        f"; an N×k similarity matrix: {bm.fmt_bytes(row['dense_similarity_bytes'])})",
        flush=True,
    )

    if not args.memory_only:
        x = jax.random.normal(jax.random.key(args.seed + 1), (n, d), jnp.float32)
        x = jax.block_until_ready(x / jnp.linalg.norm(x, axis=1, keepdims=True))
        # Iterations one by one from the same start as balanced_clusters' k-means.
        mu, _ = kmeans(x, num_clusters=k, iterations=0, key=key, chunk_size=chunk)
        jax.block_until_ready(step(x, mu))  # compile
        seconds = []
        for _ in range(args.iterations):
            t = time.perf_counter()
            mu, _, _ = jax.block_until_ready(step(x, mu))
            seconds.append(time.perf_counter() - t)
        jax.block_until_ready(whole(x))  # compile (and warm up)
        t = time.perf_counter()
        groups = jax.block_until_ready(whole(x))
        row["total_s"] = time.perf_counter() - t
        row["iteration_s"] = statistics.median(seconds)
        row["iteration_seconds"] = seconds
        row["iteration_tflops"] = 4.0 * n * k * d / row["iteration_s"] / 1e12
        sizes = jnp.bincount(groups, length=k)
        row["group_sizes_ok"] = bool(jnp.all(sizes[:-1] == c)) and int(sizes[-1]) == n - (k - 1) * c
        print(
            f"time per iteration (median of {args.iterations}): {row['iteration_s']:.4f} s "
            f"({row['iteration_tflops']:.2f} TFLOP/s); balanced_clusters total "
            f"{row['total_s']:.3f} s (compile {row['compile_s']:.1f} s)",
            flush=True,
        )

    meta = {"platform": platform, "jax": jax.__version__, "config": vars(args)}
    text = json.dumps({"meta": meta, "result": row}, indent=1)
    bm.save_outputs(out, {f"{STEM}.json": text}, update_results=args.update_results)
    print(out / f"{STEM}.json")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 on success, 2 with one ``error:`` line for a bad value."""
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
