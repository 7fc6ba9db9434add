"""The streamed gradient cache against the in-memory one: time per train step, side by side.

``python -m experiments.bench_streamed`` times, in one process on ``--devices`` simulated
CPU devices, calls alternating round by round (:func:`experiments.common.benchmarking.
alternating_times`):

- in-memory: the gradient-cached step of :mod:`contrastive.step.train_step` (GradCache, Gao et
  al. 2021), given the host batch (numpy) placed on the devices first, as the training
  loop places every batch;
- streamed: the step of :mod:`contrastive.step.streamed.step`, which reads every chunk of the
  same host batch twice from a :class:`contrastive.step.streamed.step.ChunkSource` (three times
  with ``--shared-tower``), with prefetch on (chunk ``k + 1`` read on a thread while chunk
  ``k`` computes) and off, at each ``--read-latency-ms`` (a sleep before every read,
  standing in for storage: without prefetch every read's latency adds to the step).

Model: two MLP towers (a CLIP-like pair; ``--shared-tower``: one tower on two views, as
SimCLR), InfoNCE ring loss, AdamW. Both steps see the same state and batch; their losses
and gradient norms are compared. Medians of ``--repeats`` rounds and the ratio streamed /
in-memory (issue 19's target: at most 1.25 with prefetch). The simulated devices share the
host's cores, so absolute times are host totals; the ratios are what to read.

Writes ``bench_streamed.{json,md}`` into the run directory it prints.

    python -m experiments.bench_streamed                       # B = 4096, chunk 512
    python -m experiments.bench_streamed --read-latency-ms 0,5,20 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments.common import benchmarking as bm
from experiments.common import run_dir
from experiments.common.cli import command_parser, positive_int, run_main

STEM = "bench_streamed"
TARGET = 1.25  # issue 19: streamed / in-memory, prefetch on


def latency_list(text: str) -> list[float]:
    """``"0,10"`` -> ``[0.0, 10.0]``: milliseconds, each 0 or more (argparse ``type``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of milliseconds such as 0,10"
        ) from None
    if not values or min(values) < 0 or any(v != v or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"give finite milliseconds >= 0 such as 0,10, got {text}")
    return values


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(f"python -m experiments.{STEM}", __doc__)
    p.add_argument("--devices", type=positive_int, default=8, help="simulated CPU devices")
    p.add_argument("--batch", type=positive_int, default=4096, help="global batch (pairs)")
    p.add_argument("--chunk", type=positive_int, default=512, help="global rows per chunk")
    p.add_argument("--width", type=positive_int, default=512, help="MLP tower width")
    p.add_argument("--input-dim", type=positive_int, default=256, help="input features")
    p.add_argument("--repeats", type=positive_int, default=5, help="alternating rounds")
    p.add_argument(
        "--read-latency-ms",
        type=latency_list,
        default=[0.0, 10.0],
        help="simulated latency of every chunk read, one case per value (comma-separated)",
    )
    p.add_argument(
        "--shared-tower", action="store_true", help="one tower on two views (three reads)"
    )
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    bm.check_batch_and_chunk(p, args)
    return args


class SlowSource:
    """A :class:`contrastive.step.streamed.step.ChunkSource` over host arrays that waits
    ``latency_s`` before every read (a stand-in for storage; the copy of the rows is real)."""

    def __init__(self, inner: Any, latency_s: float):
        self._inner, self.latency_s, self.reads = inner, latency_s, 0

    @property
    def batch_sizes(self) -> tuple[int, int]:
        return self._inner.batch_sizes

    @property
    def num_chunks(self) -> int:
        return self._inner.num_chunks

    def read(self, step: int, chunk: int) -> Any:
        self.reads += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        return self._inner.read(step, chunk)


def _label(prefetch: bool, latency: float) -> str:
    return f"streamed, prefetch {'on' if prefetch else 'off'}, {latency:g} ms/read"


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    bm.simulate_cpu_devices(args.devices)
    out = run_dir.create(STEM, args.out)

    import jax
    import numpy as np
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.step import optim
    from contrastive.step import train_step as ts
    from contrastive.step.streamed.step import batch_source, make_streamed_step
    from contrastive.step_configs import LossConfig, OptimConfig, TrainConfig

    mesh = mesh_lib.make_mesh(num_devices=args.devices)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.input_dim), dtype=np.float32)
    y = x + np.float32(0.1) * rng.standard_normal(x.shape, dtype=np.float32)
    oc = OptimConfig(learning_rate=1e-4, total_steps=1000)
    cfg = TrainConfig(loss=LossConfig("infonce"), optim=oc, chunk_size=args.chunk)
    tx = optim.make_optimizer(oc)
    rngs = nnx.Rngs(0)
    towers = [models.MLPEncoder(args.input_dim, args.width, 2, rngs=rngs)]
    if not args.shared_tower:
        towers.append(models.MLPEncoder(args.input_dim, args.width, 2, rngs=rngs))
    model = models.DualEncoder(*towers, embed_dim=128, head_hidden=args.width, rngs=rngs)
    graphdef, state = ts.create_train_state(model, tx)
    state = ts.place_state(state, mesh)
    in_memory = ts.make_train_step(graphdef, cfg, mesh, tx=tx, donate=False)

    def in_memory_step():
        return in_memory(state, mesh_lib.shard_batch((x, y), mesh), None)

    cases = {"in-memory": in_memory_step}
    sources = {}
    for latency in args.read_latency_ms:
        for prefetch in (True, False):
            step = make_streamed_step(graphdef, cfg, mesh, tx=tx, prefetch=prefetch, donate=False)
            src = SlowSource(batch_source((x, y), mesh, chunk_size=args.chunk), latency / 1e3)
            sources[_label(prefetch, latency)] = src
            cases[_label(prefetch, latency)] = lambda step=step, src=src: step(state, src, 0, None)

    # The same loss and gradient: the streamed step is the in-memory one, read in chunks.
    ref = jax.device_get(in_memory_step()[1])
    agree = {}
    for name, fn in list(cases.items())[1:]:
        got = jax.device_get(fn()[1])
        agree[name] = max(
            abs(float(got[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-30)
            for k in ("loss", "grad_norm")
        )
    for src in sources.values():
        src.reads = 0
    times = bm.alternating_times(list(cases.values()), repeats=args.repeats)
    reads = {name: src.reads // (args.repeats + 1) for name, src in sources.items()}
    walls = zip(cases, times, strict=True)
    medians = {name: statistics.median(w for w, _ in t) for name, t in walls}
    base = medians["in-memory"]
    rows = []
    for name, t in medians.items():
        row = {"step": name, "median_s": t, "vs_in_memory": t / base}
        if name in sources:
            src = sources[name]
            row |= {
                "prefetch": "prefetch on" in name,
                "read_latency_ms": src.latency_s * 1e3,
                "reads_per_step": reads[name],
                "latency_per_step_s": reads[name] * src.latency_s,
                "max_rel_diff_loss_grad_norm": agree[name],
            }
        rows.append(row)
    first = _label(True, args.read_latency_ms[0])
    summary = {
        "command": f"python -m experiments.{STEM}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_results")},
        "rows": rows,
        "target": {
            "streamed_over_in_memory_at_most": TARGET,
            "case": first,
            "ratio": medians[first] / base,
            "met": medians[first] / base <= TARGET,
        },
    }
    text = markdown(rows, args, summary["target"])
    print(text)
    bm.save_outputs(
        out,
        {f"{STEM}.json": json.dumps(summary, indent=2), f"{STEM}.md": text},
        update_results=args.update_results,
    )
    print(f"run directory: {out}")
    return summary


def markdown(rows: list[dict], args: argparse.Namespace, target: dict) -> str:
    """The table: medians, the ratio to the in-memory step, reads and their latency."""
    towers = "one shared MLP tower" if args.shared_tower else "two MLP towers"
    lines = [
        f"Streamed vs in-memory gradient-cached train step, {args.devices} simulated CPU "
        f"devices, B = {args.batch}, chunk {args.chunk}, {towers} (width {args.width}, "
        f"{args.input_dim} input features), InfoNCE ring loss, AdamW; medians of "
        f"{args.repeats} alternating rounds. In-memory: the host batch placed on the devices, "
        "then the step; streamed: every chunk read from host numpy arrays (with the latency "
        "given) on each pass.",
        "",
        "| step | median s | vs in-memory | reads/step | read latency/step s | loss, grad-norm "
        "rel. diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = ["", "", ""]
        if "reads_per_step" in r:
            extra = [
                str(r["reads_per_step"]),
                f"{r['latency_per_step_s']:.3f}",
                f"{r['max_rel_diff_loss_grad_norm']:.1e}",
            ]
        lines.append(
            f"| {r['step']} | {r['median_s']:.3f} | {r['vs_in_memory']:.2f} | "
            + " | ".join(extra)
            + " |"
        )
    verdict = "met" if target["met"] else "not met"
    lines += [
        "",
        f"Target (issue 19): {target['case']} at most {TARGET}x the in-memory step: "
        f"{target['ratio']:.2f}x, {verdict}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
