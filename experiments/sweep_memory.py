"""Per-device memory and speed of the contrastive loss against batch size (issue #5).

The shape of the Inf-CL memory table (Cheng et al. 2024, arXiv 2410.17243): the dense loss
grows as ``B²``, the tiled and ring losses as ``B``, the ring's per device as ``B / n``.
For every batch size, loss and method, ``jax.value_and_grad`` with respect to ``x`` and
``y`` is compiled (nothing is allocated: ``jax.ShapeDtypeStruct`` inputs) and XLA's memory
analysis gives, per device, the temporaries and the inputs plus outputs (``x``, ``y``, the
loss, ``dx``, ``dy``). Methods:

- ``dense``: ``losses.reference``, one device; the ``B × B`` matrix and its gradient.
- ``tiled``: ``losses.<loss>``, one device; tiles and a custom VJP.
- ``ring``: ``losses.sharded(losses.<loss>, mesh, "data")`` over ``--devices`` devices.
- ``gathered``: ``losses.gathered`` inside ``shard_map``, the all-gather baseline.
- ``train_cached`` / ``train_plain``: the whole ``contrastive.step.train_step`` (shared MLP
  encoder on ``[B, 64]`` inputs, ring loss, AdamW) with / without gradient caching.

It also times the loss methods where that is quick (median of ``--repeats``; the simulated
devices share the host's cores, so ``ring`` and ``gathered`` times are host totals) and
finds, by doubling and bisection over compiled memory, the largest batch whose
temporaries + inputs + outputs fit ``--budget-gib`` per device. The dense loss is compiled
up to ``--dense-max-batch`` and extrapolated as ``B²`` above it (marked ``*``).

    python -m experiments.sweep_memory                          # B = 1k .. 4M, D = 512
    python -m experiments.sweep_memory --losses infonce,sigmoid,decoupled --dim 768
    python -m experiments.sweep_memory --batch 1024 1048576 --time-max-batch 0 --fit none

Writes ``memory_sweep.{csv,json,md,png}`` into a run directory (``--out``, default
``runs/memory_sweep-<time>/``; ``--update-results`` also refreshes ``experiments/results/``)
and prints the Markdown tables; the reporting lives in ``experiments/memory_report.py``.
Numbers are XLA:CPU's buffer assignment; XLA:GPU/TPU differ in detail (fusion, library
workspaces), not in how memory scales.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive.loss_registry import LOSS_NAMES
from experiments.common import benchmarking as bm
from experiments.common import memory_report, run_dir
from experiments.common.cli import (
    command_parser,
    nonnegative_int,
    positive_float,
    positive_int,
    run_main,
)

LOSS_METHODS = bm.LOSS_METHODS
TRAIN_METHODS = ("train_cached", "train_plain")
DEFAULT_BATCH = [1024, 4096, 16384, 65536, 262144, 1048576, 4194304]
# The fields of a measurement (benchmarking.compiled_memory), empty: a shape XLA refused.
NO_MEASUREMENT = dict.fromkeys(
    ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "io_bytes", "total_bytes",
     "compile_s"),
) | {"extrapolated": False, "error": ""}  # fmt: skip


@dataclasses.dataclass
class Method:
    """One column of the sweep: how to compile it at a batch size, and maybe run it."""

    name: str
    loss: str
    devices: int
    lower_args: Callable[[int], tuple]  # batch -> (lowerable, *args) for compile only
    run: Callable[[int], float] | None = None  # batch -> median seconds


def loss_method(name: str, loss: str, dim: int, mesh, block_size, repeats: int) -> Method:
    """A loss method (``benchmarking.loss_grad_fn``) on (B, dim) float32 embeddings."""
    fn = bm.loss_grad_fn(name, loss, mesh, block_size)
    sharded = name in ("ring", "gathered")
    sharding = NamedSharding(mesh, P("data")) if sharded else None

    def lower_args(batch):
        spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
        return fn, spec, spec

    def run(batch):
        return bm.median_seconds([fn], *bm.unit_embeddings(batch, dim, sharding), repeats=repeats)[
            0
        ]

    return Method(name, loss, mesh.size if sharded else 1, lower_args, run)


def train_method(name: str, loss: str, dim: int, mesh, args) -> Method:
    """The full train step (compile only): shared MLP tower, ring loss, AdamW."""
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models
    from contrastive.loss_registry import LOSSES
    from contrastive.step import optim
    from contrastive.step import train_step as ts
    from contrastive.step_configs import LossConfig, TrainConfig

    chunk = args.train_chunk if name == "train_cached" else None
    model = models.DualEncoder(
        models.MLPEncoder(args.train_input_dim, args.train_width, 2, rngs=nnx.Rngs(0)),
        embed_dim=dim,
        init_bias=LOSSES[loss].bias,
        rngs=nnx.Rngs(0),
    )
    cfg = TrainConfig(loss=LossConfig(loss, block_size=args.block_size), chunk_size=chunk)
    graphdef, state = ts.create_train_state(model, optim.make_optimizer(cfg.optim))
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    step = ts.make_train_step(graphdef, cfg, mesh)
    sharding = mesh_lib.batch_sharding(mesh)

    def lower_args(batch):
        spec = jax.ShapeDtypeStruct((batch, args.train_input_dim), jnp.float32, sharding=sharding)
        return step, state, (spec, spec), None

    return Method(name, loss, mesh.size, lower_args)


class Sweep:
    """Compiled memory per (method, batch), memoised; dense above a size is extrapolated."""

    def __init__(self, dense_max_batch: int):
        self.dense_max = dense_max_batch
        self.memo: dict[tuple[str, str, int], dict] = {}

    def measure(self, m: Method, batch: int) -> dict:
        key = (m.loss, m.name, batch)
        if key not in self.memo:
            self.memo[key] = self._measure(m, batch)
        return self.memo[key]

    def _measure(self, m: Method, batch: int) -> dict:
        if m.name == "dense" and batch > self.dense_max:
            return self._extrapolate(m, batch, None)
        try:
            return {**bm.compiled_memory(*m.lower_args(batch)), "extrapolated": False, "error": ""}
        except Exception as e:  # noqa: BLE001 (a shape XLA refuses: record, go on)
            if m.name == "dense":
                return self._extrapolate(m, batch, f"{type(e).__name__}: {e}"[:200])
            return {**NO_MEASUREMENT, "error": f"{type(e).__name__}: {e}"[:200]}

    def _extrapolate(self, m: Method, batch: int, error: str | None) -> dict:
        """Dense temporaries scale as B², its inputs and outputs as B."""
        base_batch = 1 << (min(batch - 1, self.dense_max).bit_length() - 1)
        base = self.measure(m, base_batch)
        r = batch / base_batch
        temp, io = base["temp_bytes"] * r * r, base["io_bytes"] * r
        return {
            **NO_MEASUREMENT,
            "temp_bytes": int(temp),
            "io_bytes": int(io),
            "total_bytes": int(temp + io),
            "extrapolated": True,
            "error": error or f"extrapolated as B^2 from B={base_batch}",
        }


def largest_batch(sweep: Sweep, m: Method, budget: float, swept, quantum: int, tol: float):
    """Largest multiple of ``quantum`` whose per-device total fits ``budget``, or None.

    Starts from the swept sizes, doubles (or halves) to bracket the answer, then bisects
    until the bracket is within ``tol`` (relative) or one ``quantum``.
    """

    def fits(b: int) -> bool:
        total = sweep.measure(m, b)["total_bytes"]
        return total is not None and total <= budget

    done = sorted(b for b in swept if b % quantum == 0) or [quantum]
    lo = max((b for b in done if fits(b)), default=None)
    if lo is None:  # nothing swept fits: halve from the smallest
        hi = done[0]
        while lo is None:
            b = hi // 2 // quantum * quantum
            if b < quantum:
                return None
            lo, hi = (b, hi) if fits(b) else (None, b)
    else:  # the next swept size up does not fit (lo is the largest that does)
        hi = min((b for b in done if b > lo), default=None)
        while hi is None:
            if lo >= 2**40:
                return lo
            lo, hi = (2 * lo, None) if fits(2 * lo) else (lo, 2 * lo)
    while hi - lo > max(quantum, tol * lo):
        mid = (lo + hi) // 2 // quantum * quantum
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m experiments.sweep_memory", __doc__)
    p.add_argument("--batch", type=positive_int, nargs="+", default=DEFAULT_BATCH, help="global B")
    p.add_argument("--dim", type=positive_int, default=512, help="embedding width D")
    p.add_argument("--losses", default="infonce", help="comma-separated: " + ",".join(LOSS_NAMES))
    p.add_argument(
        "--methods",
        default=",".join(LOSS_METHODS + TRAIN_METHODS),
        help="comma-separated subset of " + ",".join(LOSS_METHODS + TRAIN_METHODS),
    )
    p.add_argument(
        "--devices", type=positive_int, default=8, help="devices of the ring / all-gather"
    )
    p.add_argument(
        "--block-size", type=positive_int, default=None, help="tile edge (default: loss's)"
    )
    p.add_argument(
        "--budget-gib", type=positive_float, default=80.0, help="per-device memory budget"
    )
    p.add_argument("--time-max-batch", type=nonnegative_int, default=16384,
                   help="time dense/tiled/ring up to this batch (0: time nothing)")  # fmt: skip
    p.add_argument("--gathered-time-max-batch", type=nonnegative_int, default=4096,
                   help="time the all-gather up to this batch (0: never)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per method; the median is reported")  # fmt: skip
    p.add_argument("--dense-max-batch", type=positive_int, default=1 << 24,
                   help="compile dense up to this batch; extrapolate as B² above")  # fmt: skip
    p.add_argument(
        "--fit",
        default="dense,tiled,ring,gathered,train_cached",
        help="methods whose largest batch under the budget is searched, or none",
    )
    p.add_argument(
        "--fit-quantum", type=positive_int, default=1024, help="batch granularity of --fit"
    )
    p.add_argument(
        "--fit-tol", type=positive_float, default=0.01, help="relative bisection tolerance"
    )
    p.add_argument("--train-max-batch", type=positive_int, default=1 << 20, help="train step up to")
    p.add_argument(
        "--train-chunk", type=positive_int, default=1024, help="gradient-cache chunk rows"
    )
    p.add_argument("--train-width", type=positive_int, default=1024, help="MLP tower width")
    p.add_argument("--train-input-dim", type=positive_int, default=64, help="MLP input features")
    p.add_argument("--no-plot", action="store_true", help="write no memory_sweep.png")
    run_dir.add_output_flags(p)
    return p


def _measure_table(sweep: Sweep, table: list[Method], loss: str, args) -> list[dict]:
    """Compile (and where quick, time) every method of one loss at every batch size."""
    rows = []
    for m in table:
        for batch in sorted(args.batch):
            if batch % m.devices:
                continue
            if m.name in TRAIN_METHODS and batch > args.train_max_batch:
                continue
            r = sweep.measure(m, batch)
            t_max = args.time_max_batch
            if m.name == "gathered":
                t_max = min(t_max, args.gathered_time_max_batch)
            seconds = None
            if m.run is not None and batch <= t_max and r["temp_bytes"] is not None:
                seconds = m.run(batch)
            row = {"loss": loss, "method": m.name, "devices": m.devices, "batch": batch}
            rows.append({**row, "dim": args.dim, **r, "time_s": seconds})
            print(
                f"{loss:9s} {m.name:12s} B={batch:>9,} temp {bm.fmt_bytes(r['temp_bytes']):>10s}"
                f"{'*' if r['extrapolated'] else ' '} total {bm.fmt_bytes(r['total_bytes']):>10s}"
                f" time {'-' if seconds is None else f'{seconds:.3f} s':>8s}"
                f"  (compile {r['compile_s']} s) {r['error']}",
                flush=True,
            )
    return rows


def _fit_table(sweep: Sweep, table: list[Method], loss: str, fit_methods, args) -> list[dict]:
    """The largest batch under the budget of every method in ``fit_methods``."""
    fits = []
    for m in table:
        if m.name not in fit_methods:
            continue
        quantum = max(args.fit_quantum, m.devices)
        start = time.perf_counter()
        budget = args.budget_gib * bm.GiB
        best = largest_batch(sweep, m, budget, args.batch, quantum, args.fit_tol)
        r = sweep.measure(m, best) if best else {"total_bytes": None, "extrapolated": False}
        fits.append(
            {
                "loss": loss,
                "method": m.name,
                "devices": m.devices,
                "budget_gib": args.budget_gib,
                "largest_batch": best,
                "total_bytes": r["total_bytes"],
                "extrapolated": r["extrapolated"],
            }
        )
        print(
            f"{loss:9s} {m.name:12s} largest batch under {args.budget_gib:g} GiB: "
            f"{'-' if best is None else f'{best:,}'} ({bm.fmt_bytes(r['total_bytes'])} per "
            f"device; {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return fits


def run(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    args.losses = [s for s in args.losses.split(",") if s]
    methods = [s for s in args.methods.split(",") if s]
    fit_methods = [] if args.fit == "none" else [s for s in args.fit.split(",") if s]
    known_methods = LOSS_METHODS + TRAIN_METHODS
    for flag, values, known in (
        ("--losses", args.losses, LOSS_NAMES),
        ("--methods", methods, known_methods),
        ("--fit", fit_methods, known_methods),
    ):
        unknown = [v for v in values if v not in known]
        if unknown or (not values and flag != "--fit"):
            raise ValueError(
                f"{flag} {','.join(values)!r}: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {','.join(known)}" + (", or none" if flag == "--fit" else "")
            )
    if "train_cached" in methods and args.train_chunk % args.devices:
        raise ValueError(
            f"--train-chunk {args.train_chunk} must be a multiple of --devices {args.devices}"
        )
    bm.simulate_cpu_devices(args.devices)  # before the first jax operation
    from contrastive.mesh import make_mesh

    t_start = time.perf_counter()
    out = run_dir.create(memory_report.STEM, args.out)
    mesh, one = make_mesh(num_devices=args.devices), make_mesh(num_devices=1)
    meta = {
        "platform": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
    }
    print(f"{meta['platform']}, jax {meta['jax']}, {args.devices}-device mesh", flush=True)

    sweep = Sweep(args.dense_max_batch)
    rows, fits = [], []
    for loss in args.losses:
        table: list[Method] = []
        for name in methods:
            if name in LOSS_METHODS:
                m = one if name in ("dense", "tiled") else mesh
                table.append(loss_method(name, loss, args.dim, m, args.block_size, args.repeats))
            elif loss == args.losses[0]:
                table.append(train_method(name, loss, args.dim, mesh, args))
        rows += _measure_table(sweep, table, loss, args)
        fits += _fit_table(sweep, table, loss, fit_methods, args)

    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    md, names = memory_report.write_report(rows, fits, args, meta, out)
    print(md)
    bm.save_outputs(out, {}, update_results=args.update_results, written=names)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
