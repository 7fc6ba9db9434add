"""The train step's time on simulated devices: gradient-cached, plain, sharded optimiser state.

``python -m experiments.bench_train_step`` times the gradient-cached and the plain train step
(two-view MLP tower, InfoNCE ring loss, AdamW), and the cached step with the optimiser state
sharded (``shard_optimizer=True``), in one process on ``--devices`` simulated CPU devices,
calls alternating. Medians of ``--repeats`` rounds; the ratios are what to read (the simulated
devices share the host's cores, so absolute times are host totals).

Writes ``bench_train_step.{json,md}`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from experiments.common import benchmarking as bm
from experiments.common import run_dir
from experiments.common.cli import command_parser, positive_int, run_main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser("python -m experiments.bench_train_step", __doc__)
    p.add_argument("--devices", type=positive_int, default=8, help="simulated CPU devices")
    p.add_argument("--batch", type=positive_int, default=4096, help="global batch (pairs)")
    p.add_argument("--chunk", type=positive_int, default=512, help="global rows per chunk")
    p.add_argument("--width", type=positive_int, default=512, help="MLP tower width")
    p.add_argument("--input-dim", type=positive_int, default=256, help="input features")
    p.add_argument("--repeats", type=positive_int, default=5, help="alternating rounds")
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    bm.check_batch_and_chunk(p, args)
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    bm.simulate_cpu_devices(args.devices)
    out = run_dir.create("bench_train_step", args.out)

    import jax
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.step import optim
    from contrastive.step import train_step as ts
    from contrastive.step_configs import LossConfig, OptimConfig, TrainConfig

    mesh = mesh_lib.make_mesh(num_devices=args.devices)
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (args.batch, args.input_dim))
    y = x + 0.1 * jax.random.normal(k2, x.shape)
    batch = mesh_lib.shard_batch((x, y), mesh)
    oc = OptimConfig(learning_rate=1e-4, total_steps=1000)

    def build(chunk, **extra):
        rngs = nnx.Rngs(0)
        tower = models.MLPEncoder(args.input_dim, args.width, 2, rngs=rngs)
        model = models.DualEncoder(tower, embed_dim=128, head_hidden=args.width, rngs=rngs)
        cfg = TrainConfig(loss=LossConfig("infonce"), optim=oc, chunk_size=chunk, **extra)
        graphdef, state = ts.create_train_state(model, optim.make_optimizer(oc))
        if extra.get("shard_optimizer"):
            state = ts.place_state(state, mesh, shard_optimizer=True)
        else:
            state = mesh_lib.place_params(state, mesh)
        step = ts.make_train_step(graphdef, cfg, mesh, donate=False)
        return lambda: step(state, batch, None)

    cases = {
        "cached": build(args.chunk),
        "cached, sharded optimiser": build(args.chunk, shard_optimizer=True),
        "plain": build(None),
    }
    seconds = bm.median_seconds(list(cases.values()), repeats=args.repeats)
    times = dict(zip(cases, seconds, strict=True))
    rows = [
        {"step": step, "median_s": t, "vs_cached": t / times["cached"]} for step, t in times.items()
    ]
    summary = {
        "command": "python -m experiments.bench_train_step",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_results")},
        "rows": rows,
    }
    table = [
        f"Train step, {args.devices} simulated CPU devices, B = {args.batch}, chunk "
        f"{args.chunk}, MLP width {args.width}; medians of {args.repeats} alternating rounds.",
        "",
        "| step | median s | vs cached |",
        "|---|---:|---:|",
        *(f"| {r['step']} | {r['median_s']:.3f} | {r['vs_cached']:.2f} |" for r in rows),
    ]
    text = "\n".join(table) + "\n"
    print(text)
    bm.save_outputs(
        out,
        {"bench_train_step.json": json.dumps(summary, indent=2), "bench_train_step.md": text},
        update_results=args.update_results,
    )
    print(f"run directory: {out}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
