"""Time of the gradient-cached step against the plain step, side by side in one process.

Both compute the loss and the parameter gradients of a dual encoder on the same batch
(``contrastive.step.train_step.loss_and_grads``, no optimiser); the cached one runs the encoder
in chunks: one extra forward pass, so about 4/3 of the plain time is the floor. Calls
alternate (plain, cached, plain, ...) so that machine load hits both alike; medians and
their ratio are printed, and written as ``bench_gradcache.json`` into a run directory
(``--out``, default ``runs/bench_gradcache-<time>/``; ``--update-results`` also refreshes
``experiments/results/``).

    python -m experiments.bench_gradcache                      # small default, 1 CPU device
    python -m experiments.bench_gradcache --batch 8192 --chunk 2048 --width 1024
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from contrastive import mesh as mesh_lib
from contrastive import models
from contrastive.loss_registry import LOSS_NAMES
from contrastive.step import train_step as ts
from contrastive.step_configs import LossConfig, TrainConfig
from experiments.common import benchmarking as bm
from experiments.common import run_dir
from experiments.common.cli import OneLineParser, positive_int, run_main

STEM = "bench_gradcache"


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m experiments.bench_gradcache",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--batch", type=positive_int, default=4096, help="global batch B")
    p.add_argument("--chunk", type=positive_int, default=1024,
                   help="gradient-cache chunk size (global rows)")  # fmt: skip
    p.add_argument("--encoder", choices=["mlp", "resnet", "vit"], default="mlp",
                   help="the image tower (both towers share it)")  # fmt: skip
    p.add_argument("--input-dim", type=positive_int, default=64, help="MLP input features")
    p.add_argument("--width", type=positive_int, default=1024, help="encoder width")
    p.add_argument("--depth", type=positive_int, default=3, help="encoder depth")
    p.add_argument("--embed-dim", type=positive_int, default=64, help="embedding dimension")
    p.add_argument("--loss", choices=LOSS_NAMES, default="infonce", help="the contrastive loss")
    p.add_argument("--reps", type=positive_int, default=11, help="timed calls of each step")
    p.add_argument("--devices", type=positive_int, default=1, help="devices in the mesh")
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    bm.check_batch_and_chunk(p, args)
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    bm.simulate_cpu_devices(args.devices)  # before the first jax operation
    out = run_dir.create(STEM, args.out)
    mesh = mesh_lib.make_mesh(num_devices=args.devices)
    rngs = nnx.Rngs(0)
    shape = (args.input_dim,) if args.encoder == "mlp" else (16, 16, 3)
    tower = models.make_image_encoder(
        args.encoder, shape, width=args.width, depth=args.depth, rngs=rngs
    )
    bias = models.SIGLIP_INIT_BIAS if args.loss == "sigmoid" else None
    model = models.DualEncoder(tower, embed_dim=args.embed_dim, init_bias=bias, rngs=rngs)
    graphdef, params = nnx.split(model)
    params = mesh_lib.place_params(params, mesh)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *shape)).astype(np.float32)
    batch = mesh_lib.shard_batch(
        (x, x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)), mesh
    )

    steps = {}
    for name, chunk in (("plain", None), ("cached", args.chunk)):
        cfg = TrainConfig(loss=LossConfig(args.loss), chunk_size=chunk)
        f = jax.jit(functools.partial(ts.loss_and_grads, graphdef=graphdef, config=cfg, mesh=mesh))
        t0 = time.perf_counter()
        steps[name] = f.lower(params, batch, None).compile()
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)

    calls = bm.alternating_times(list(steps.values()), params, batch, None, repeats=args.reps)
    times = {name: [w for w, _ in t] for name, t in zip(steps, calls, strict=True)}
    cpu = {name: [c for _, c in t] for name, t in zip(steps, calls, strict=True)}
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    result = {
        "device": str(jax.devices()[0].platform),
        "devices": args.devices,
        "batch": args.batch,
        "chunk": args.chunk,
        "encoder": args.encoder,
        "width": args.width,
        "depth": args.depth,
        "loss": args.loss,
        "median_plain_ms": med["plain"] * 1e3,
        "median_cached_ms": med["cached"] * 1e3,
        "ratio": med["cached"] / med["plain"],
        # Best-of is less sensitive to other processes on a shared machine.
        "min_plain_ms": min(times["plain"]) * 1e3,
        "min_cached_ms": min(times["cached"]) * 1e3,
        "ratio_of_min": min(times["cached"]) / min(times["plain"]),
        # CPU time used by this process: the work done, whatever else runs on the machine.
        "median_plain_cpu_s": med_cpu["plain"],
        "median_cached_cpu_s": med_cpu["cached"],
        "cpu_ratio": med_cpu["cached"] / med_cpu["plain"],
    }
    print(
        f"B={args.batch} chunk={args.chunk} {args.encoder} width={args.width} depth={args.depth}: "
        f"plain median {result['median_plain_ms']:.1f} ms, cached median "
        f"{result['median_cached_ms']:.1f} ms, ratio {result['ratio']:.3f} "
        f"(best-of: {result['min_plain_ms']:.1f} / {result['min_cached_ms']:.1f} ms, ratio "
        f"{result['ratio_of_min']:.3f}); CPU-time medians {med_cpu['plain']:.2f} / "
        f"{med_cpu['cached']:.2f} s, ratio {result['cpu_ratio']:.3f}"
    )
    texts = {f"{STEM}.json": json.dumps(result, indent=2)}
    bm.save_outputs(out, texts, update_results=args.update_results)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
