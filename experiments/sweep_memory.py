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
- ``train_cached`` / ``train_plain``: the whole ``contrastive.train_step`` (shared MLP
  encoder on ``[B, 64]`` inputs, ring loss, AdamW) with / without gradient caching.

It also times the loss methods where that is quick (median of ``--repeats``; the simulated
devices share the host's cores, so ``ring`` and ``gathered`` times are host totals) and
finds, by doubling and bisection over compiled memory, the largest batch whose
temporaries + inputs + outputs fit ``--budget-gib`` per device. The dense loss is compiled
up to ``--dense-max-batch`` and extrapolated as ``B²`` above it (marked ``*``).

    python -m experiments.sweep_memory                          # B = 1k .. 4M, D = 512
    python -m experiments.sweep_memory --losses infonce,sigmoid,decoupled --dim 768
    python -m experiments.sweep_memory --batch 1024 1048576 --time-max-batch 0 --fit none

Writes ``memory_sweep.{csv,json,md,png}`` to ``--out`` and prints the Markdown tables.
Numbers are XLA:CPU's buffer assignment; XLA:GPU/TPU differ in detail (fusion, library
workspaces), not in how memory scales.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import losses  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEM = "memory_sweep"
GiB, MiB = 2**30, 2**20
LOSSES = ("infonce", "sigmoid", "decoupled")
HYPER = {
    "infonce": {"temperature": 0.07},
    "sigmoid": {"temperature": 0.1, "bias": -10.0},
    "decoupled": {"temperature": 0.1},
}
LOSS_METHODS = ("dense", "tiled", "ring", "gathered")
TRAIN_METHODS = ("train_cached", "train_plain")
DEFAULT_BATCH = [1024, 4096, 16384, 65536, 262144, 1048576, 4194304]


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'; three significant figures, binary units."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def fmt_batch(b: int) -> str:
    """1048576 -> '1M', 16384 -> '16k', 1000 -> '1000'."""
    if b >= 2**20 and b % 2**20 == 0:
        return f"{b >> 20}M"
    if b >= 1024 and b % 1024 == 0:
        return f"{b >> 10}k"
    return str(b)


def data_mesh(n: int):
    if n > len(jax.devices()):
        raise SystemExit(
            f"error: --devices {n} but only {len(jax.devices())} devices; on CPU set "
            f"XLA_FLAGS={_FLAG}={n} before starting Python."
        )
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def loss_grad_fn(method: str, loss: str, mesh, block_size: int | None) -> Callable:
    """``jax.jit(value_and_grad(loss, argnums=(0, 1)))`` of one method (x, y: global arrays)."""
    hyper = HYPER[loss]
    tiled = {} if block_size is None else {"block_size": block_size}
    if method == "dense":
        f = functools.partial(getattr(losses.reference, loss), **hyper)
    elif method == "tiled":
        f = functools.partial(getattr(losses, loss), **hyper, **tiled)
    elif method == "ring":
        ring = losses.sharded(getattr(losses, loss), mesh, "data")
        f = lambda x, y: ring(x, y, **hyper, **tiled)
    elif method == "gathered":
        g = losses.gathered(getattr(losses, loss), "data")
        f = jax.shard_map(
            lambda x, y: g(x, y, **hyper, **tiled),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def memory(lowerable, *args) -> dict[str, Any]:
    """Compile only; per-device temporaries and inputs + outputs, in bytes."""
    start = time.perf_counter()
    m = lowerable.lower(*args).compile().memory_analysis()
    io = m.argument_size_in_bytes + m.output_size_in_bytes
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "io_bytes": int(io),
        "total_bytes": int(m.temp_size_in_bytes + io),
        "compile_s": round(time.perf_counter() - start, 2),
    }


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def embeddings(batch: int, dim: int, sharding=None):
    """Unit-norm x and a noisy positive y, (batch, dim) float32."""
    kx, ky = jax.random.split(jax.random.key(batch))
    x = jax.random.normal(kx, (batch, dim), jnp.float32)
    y = x + 0.5 * jax.random.normal(ky, (batch, dim), jnp.float32)
    x, y = (a / jnp.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    return (x, y) if sharding is None else tuple(jax.device_put(a, sharding) for a in (x, y))


@dataclasses.dataclass
class Method:
    """One column of the sweep: how to compile it at a batch size, and maybe run it."""

    name: str
    loss: str
    devices: int
    lower_args: Callable[[int], tuple]  # batch -> (lowerable, *args) for compile only
    run: Callable[[int], float] | None = None  # batch -> median seconds


def loss_method(name: str, loss: str, dim: int, mesh, block_size, repeats: int) -> Method:
    fn = loss_grad_fn(name, loss, mesh, block_size)
    sharded = name in ("ring", "gathered")
    sharding = NamedSharding(mesh, P("data")) if sharded else None

    def lower_args(batch):
        spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
        return fn, spec, spec

    def run(batch):
        return median_seconds(fn, *embeddings(batch, dim, sharding), repeats=repeats)

    return Method(name, loss, mesh.size if sharded else 1, lower_args, run)


def train_method(name: str, loss: str, dim: int, mesh, args) -> Method:
    """The full train step (compile only): shared MLP tower, ring loss, AdamW."""
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models, optim
    from contrastive import train_step as ts

    chunk = args.train_chunk if name == "train_cached" else None
    model = models.DualEncoder(
        models.MLPEncoder(args.train_input_dim, args.train_width, 2, rngs=nnx.Rngs(0)),
        embed_dim=dim,
        init_bias=-10.0 if loss == "sigmoid" else None,
        rngs=nnx.Rngs(0),
    )
    cfg = ts.TrainConfig(
        loss=ts.LossConfig(loss, ring=True, block_size=args.block_size), chunk_size=chunk
    )
    graphdef, state = ts.create_train_state(model, optim.make_optimizer(cfg.optim))
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
            return {**memory(*m.lower_args(batch)), "extrapolated": False, "error": ""}
        except Exception as e:  # noqa: BLE001 (a shape XLA refuses: record, go on)
            if m.name == "dense":
                return self._extrapolate(m, batch, f"{type(e).__name__}: {e}"[:200])
            return {
                "temp_bytes": None,
                "io_bytes": None,
                "total_bytes": None,
                "compile_s": None,
                "extrapolated": False,
                "error": f"{type(e).__name__}: {e}"[:200],
            }

    def _extrapolate(self, m: Method, batch: int, error: str | None) -> dict:
        """Dense temporaries scale as B², its inputs and outputs as B."""
        base_batch = 1 << (min(batch - 1, self.dense_max).bit_length() - 1)
        base = self.measure(m, base_batch)
        r = batch / base_batch
        temp, io = base["temp_bytes"] * r * r, base["io_bytes"] * r
        return {
            "temp_bytes": int(temp),
            "io_bytes": int(io),
            "total_bytes": int(temp + io),
            "compile_s": None,
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=DEFAULT_BATCH, help="global B")
    p.add_argument("--dim", type=int, default=512, help="embedding width D")
    p.add_argument("--losses", default="infonce", help="comma-separated: " + ",".join(LOSSES))
    p.add_argument(
        "--methods",
        default=",".join(LOSS_METHODS + TRAIN_METHODS),
        help="comma-separated subset of " + ",".join(LOSS_METHODS + TRAIN_METHODS),
    )
    p.add_argument("--devices", type=int, default=8, help="devices of the ring / all-gather")
    p.add_argument("--block-size", type=int, default=None, help="tile edge (default: loss's)")
    p.add_argument("--budget-gib", type=float, default=80.0, help="per-device memory budget")
    p.add_argument("--time-max-batch", type=int, default=16384, help="time dense/tiled/ring")
    p.add_argument("--gathered-time-max-batch", type=int, default=4096, help="time all-gather")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max-batch", type=int, default=1 << 24, help="compile dense up to")
    p.add_argument(
        "--fit",
        default="dense,tiled,ring,gathered,train_cached",
        help="methods whose largest batch under the budget is searched, or none",
    )
    p.add_argument("--fit-quantum", type=int, default=1024, help="batch granularity of --fit")
    p.add_argument("--fit-tol", type=float, default=0.01, help="relative bisection tolerance")
    p.add_argument("--train-max-batch", type=int, default=1 << 20, help="train step up to")
    p.add_argument("--train-chunk", type=int, default=1024, help="gradient-cache chunk rows")
    p.add_argument("--train-width", type=int, default=1024, help="MLP tower width")
    p.add_argument("--train-input-dim", type=int, default=64, help="MLP input features")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    return p


def markdown(rows: list[dict], fits: list[dict], args, meta: dict) -> str:
    budget = fmt_bytes(args.budget_gib * GiB)
    lines = [
        f"Per-device memory of `value_and_grad` w.r.t. x and y, D = {args.dim}, float32, "
        f"compile only (XLA memory analysis on {meta['platform']}). `ring` and `gathered` "
        f"run on {args.devices} devices (per-device numbers), `dense` and `tiled` on one. "
        f"`*`: extrapolated as B² from the largest compiled size. Train steps: shared "
        f"MLP tower ({args.train_input_dim} → {args.train_width} → {args.train_width}, "
        f"head → {args.dim}), ring loss, AdamW, chunk {args.train_chunk} rows (cached).",
    ]
    batches = sorted({r["batch"] for r in rows})
    head = "| loss | method | devices | " + " | ".join(fmt_batch(b) for b in batches) + " |"
    rule = "|---|---|---|" + "---|" * len(batches)
    keys = list(dict.fromkeys((r["loss"], r["method"], r["devices"]) for r in rows))
    by = {(r["loss"], r["method"], r["batch"]): r for r in rows}

    def table(title, cell, methods=None):
        lines.extend(["", title, "", head, rule])
        for loss, method, n in keys:
            if methods is not None and method not in methods:
                continue
            cells = [cell(by.get((loss, method, b))) for b in batches]
            lines.append(f"| {loss} | {method} | {n} | " + " | ".join(cells) + " |")

    star = lambda r: "*" if r["extrapolated"] else ""
    table(
        "**Temporary memory per device** (`temp_size_in_bytes`)",
        lambda r: "" if r is None else fmt_bytes(r["temp_bytes"]) + star(r),
    )
    table(
        "**Temporaries + inputs + outputs per device** (`temp + argument + output_size_in_bytes`)",
        lambda r: "" if r is None else fmt_bytes(r["total_bytes"]) + star(r),
    )
    if any(r["time_s"] is not None for r in rows):
        table(
            "**Time of value_and_grad, median s** (simulated devices share the host's "
            f"{os.cpu_count()} cores: ring / gathered times are host totals)",
            lambda r: "" if r is None or r["time_s"] is None else f"{r['time_s']:.3f}",
            {r["method"] for r in rows if r["time_s"] is not None},
        )
    if fits:
        lines += [
            "",
            f"**Largest batch under {budget} per device** (temporaries + inputs + outputs; "
            f"bisection to {100 * args.fit_tol:g} % over compiled memory)",
            "",
            "| loss | method | devices | largest B | per-device total there |",
            "|---|---|---|---|---|",
        ]
        for f in fits:
            b = "-" if f["largest_batch"] is None else f"{f['largest_batch']:,}"
            lines.append(
                f"| {f['loss']} | {f['method']} | {f['devices']} | {b}"
                f"{'*' if f['extrapolated'] else ''} | {fmt_bytes(f['total_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    keys = list(dict.fromkeys((r["loss"], r["method"], r["devices"]) for r in rows))
    for ax, field, title in zip(
        axes,
        ("temp_bytes", "total_bytes"),
        ("temporaries", "temporaries + inputs + outputs"),
        strict=True,
    ):
        for i, (loss, method, n) in enumerate(keys):
            rs = sorted(
                (r for r in rows if (r["loss"], r["method"]) == (loss, method) and r[field]),
                key=lambda r: r["batch"],
            )
            label = f"{method} ({n} dev)" + ("" if len(args.losses) == 1 else f", {loss}")
            real = [r for r in rs if not r["extrapolated"]]
            line = ax.plot(
                [r["batch"] for r in real],
                [r[field] / GiB for r in real],
                marker="o",
                color=f"C{i}",
                label=label,
            )
            extra = [r for r in rs if r["extrapolated"]]
            if extra:
                tail = real[-1:] + extra
                ax.plot(
                    [r["batch"] for r in tail],
                    [r[field] / GiB for r in tail],
                    ls="--",
                    marker="o",
                    mfc="none",
                    color=line[0].get_color(),
                    label=f"{method}, extrapolated B²",
                )
        ax.axhline(args.budget_gib, color="k", ls=":", label=f"{args.budget_gib:g} GiB budget")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch size B (pairs)")
        ax.set_title(f"per-device {title}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("GiB per device")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"value_and_grad memory, D = {args.dim}, float32 (compile only)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    args.losses = [s for s in args.losses.split(",") if s]
    methods = [s for s in args.methods.split(",") if s]
    fit_methods = [] if args.fit == "none" else [s for s in args.fit.split(",") if s]
    for name, known in (("loss", LOSSES), ("method", LOSS_METHODS + TRAIN_METHODS)):
        for v in args.losses if name == "loss" else methods + fit_methods:
            if v not in known:
                raise SystemExit(f"error: unknown {name} {v!r}; choose from {','.join(known)}")
    t_start = time.perf_counter()
    mesh = data_mesh(args.devices)
    one = data_mesh(1)
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
                row = {
                    "loss": loss,
                    "method": m.name,
                    "devices": m.devices,
                    "batch": batch,
                    "dim": args.dim,
                    **r,
                    "time_s": seconds,
                }
                rows.append(row)
                print(
                    f"{loss:9s} {m.name:12s} B={batch:>9,} temp {fmt_bytes(r['temp_bytes']):>10s}"
                    f"{'*' if r['extrapolated'] else ' '} total {fmt_bytes(r['total_bytes']):>10s}"
                    f" time {'-' if seconds is None else f'{seconds:.3f} s':>8s}"
                    f"  (compile {r['compile_s']} s) {r['error'] if r['error'] else ''}",
                    flush=True,
                )
        for m in table:
            if m.name not in fit_methods:
                continue
            quantum = max(args.fit_quantum, m.devices)
            budget = args.budget_gib * GiB
            start = time.perf_counter()
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
                f"{'-' if best is None else f'{best:,}'} ({fmt_bytes(r['total_bytes'])} per "
                f"device; {time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / STEM
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    doc = {"meta": meta, "config": config, "rows": rows, "largest_batch": fits}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = markdown(rows, fits, args, meta)
    out.with_suffix(".md").write_text(md)
    if not args.no_plot:
        plot(rows, args, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out}.{{csv,json,md{'' if args.no_plot else ',png'}}} in {meta['seconds']} s")
    return rows


if __name__ == "__main__":
    main()
