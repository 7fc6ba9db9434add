"""What every benchmark script shares: simulated devices, timing, compiled memory, formatting.

Nothing here runs at import. A script that needs ``n`` simulated CPU devices calls
:func:`simulate_cpu_devices` first thing in its ``main()``, before anything touches a jax
backend; the devices cannot be added once a backend exists (XLA reads the count once).

- :func:`median_seconds` (and :func:`alternating_times`, every wall and CPU time): several
  functions called in alternation, so that load which comes and goes on a shared machine
  hits all of them alike.
- :func:`compiled_memory`: compile only (``jax.ShapeDtypeStruct`` inputs, nothing
  allocated) and read XLA's per-device buffer assignment (``memory_analysis()``).
- :func:`save_outputs`: a script's files into its run directory (``run_dir``), and into
  ``experiments/results/`` under ``--update-results``.
- :func:`fmt_bytes`, :func:`fmt_batch`: binary units and ``16k``/``1M`` batch labels.
- :func:`unit_embeddings`, :func:`loss_grad_fn`, :func:`matmul_flops`: the loss methods
  and inputs that the memory sweep and the ring benchmark both use.

Example::

    from experiments.common import benchmarking as bm
    bm.simulate_cpu_devices(8)  # before the first jax operation
    f = bm.loss_grad_fn("tiled", "infonce", mesh=None)
    spec = jax.ShapeDtypeStruct((65536, 512), jnp.float32)
    bm.fmt_bytes(bm.compiled_memory(f, spec, spec)["temp_bytes"])  # '13.8 MiB'
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import losses
from contrastive.loss_registry import LOSS_NAMES, LOSSES
from experiments.common import run_dir
from experiments.common.cli import shared_module
from experiments.common.reports import stack_record

GiB, MiB = 2**30, 2**20
# Each loss at its own default temperature (and bias), passed explicitly to both the tiled
# and the dense version.
HYPER = {
    name: {"temperature": s.temperature, **({"bias": s.bias} if s.has_bias else {})}
    for name, s in LOSSES.items()
}
LOSS_METHODS = ("dense", "tiled", "ring", "gathered")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def check_batch_and_chunk(parser: Any, args: Any) -> None:
    """The step benchmarks' rule: ``--batch`` and ``--chunk`` split evenly over ``--devices``
    and the chunk is at most the batch; otherwise the parser's one-line error (exit 2)."""
    if args.batch % args.devices or args.chunk % args.devices or args.chunk > args.batch:
        parser.error(
            f"--batch {args.batch} and --chunk {args.chunk} must be multiples of --devices "
            f"{args.devices}, with the chunk at most the batch"
        )


def simulate_cpu_devices(n: int, *, compile_only: bool = False) -> int:
    """Ask for at least ``n`` CPU devices; returns how many there are (or will be).

    Call it before the first jax operation of the process. It never lowers a count already
    asked for (``XLA_FLAGS`` or an earlier call), so under pytest, whose ``conftest`` asks
    for 8, a benchmark's ``main()`` leaves the test session's devices alone. When a backend
    is already running it only checks that there are ``n`` devices.

    ``compile_only=True`` (a script that compiles and never runs) also turns XLA:CPU's
    LLVM optimisation off: compiles take about half the time, and the buffer assignment
    that ``memory_analysis()`` reports comes before code generation, so it is the same.
    """
    if n < 1:
        raise ValueError(f"devices must be at least 1, got {n}")
    match = re.search(_DEVICE_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    want = max(n, int(match.group(1)) if match else 1, jax.config.jax_num_cpu_devices)
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:  # a backend is up: its devices are what there is
        have = len(jax.devices("cpu"))
        if have < n:
            raise ValueError(
                f"{n} devices asked for but jax already started with {have} CPU devices; "
                f"run in a fresh process (or set XLA_FLAGS={_DEVICE_FLAG}={n})"
            ) from None
        return have
    if compile_only:  # XLA reads its flags once, when the backend starts: start it now
        flags = os.environ.get("XLA_FLAGS")
        os.environ["XLA_FLAGS"] = " ".join([flags or "", *_FAST_COMPILE])
        try:
            jax.devices("cpu")
        finally:  # and leave the environment (child processes) as it was
            if flags is None:
                del os.environ["XLA_FLAGS"]
            else:
                os.environ["XLA_FLAGS"] = flags
    return want


def alternating_times(
    fns: Sequence[Callable], *args: Any, repeats: int, settle: Callable | None = None
) -> list[list[tuple[float, float]]]:
    """(wall s, CPU s of this process) of every timed call of each function on ``args``.

    Every function is called once untimed first (compile, warm up); then each round calls
    them in turn, so that load which comes and goes hits all of them alike. ``settle``,
    when given, runs untimed before every timed call, so that no call is timed right after
    another one frees gigabytes: whatever runs right after the dense loss at B = 16384 is
    slowed by ~20 % (a 4096³ matmul: 133 against 161 GFLOP/s).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            if settle is not None:
                jax.block_until_ready(settle())
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            t.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def median_seconds(
    fns: Sequence[Callable], *args: Any, repeats: int, settle: Callable | None = None
) -> list[float]:
    """Median wall time of each function, calls alternating (see :func:`alternating_times`).

    Example::

        t_tiled, t_dense = median_seconds([tiled, dense], x, y, repeats=5)
    """
    times = alternating_times(fns, *args, repeats=repeats, settle=settle)
    return [statistics.median(wall for wall, _ in t) for t in times]


def compiled_memory(lowerable: Any, *args: Any) -> dict[str, Any]:
    """Compile ``lowerable`` (a jitted function) for ``args`` and read its memory analysis.

    ``args`` may be ``jax.ShapeDtypeStruct``s: nothing is allocated. Bytes per device
    (on a mesh XLA reports the partitioned program of one device):

    - ``temp_bytes``: temporaries (activations, gradients, loss buffers);
    - ``io_bytes``: arguments + outputs;
    - ``alias_bytes``: outputs that reuse a donated argument's buffer (counted once);
    - ``total_bytes``: temp + arguments + outputs − alias, what the step holds at its peak
      in XLA's buffer assignment;
    - ``lower_s``, ``compile_s``: seconds spent tracing and compiling.
    """
    start = time.perf_counter()
    lowered = lowerable.lower(*args)
    traced = time.perf_counter()
    m = lowered.compile().memory_analysis()
    io = m.argument_size_in_bytes + m.output_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(alias),
        "io_bytes": int(io),
        "total_bytes": int(m.temp_size_in_bytes + io - alias),
        "lower_s": round(traced - start, 2),
        "compile_s": round(time.perf_counter() - traced, 2),
    }


def save_outputs(
    out: Path, texts: Mapping[str, str], *, update_results: bool, written: Sequence[str] = ()
) -> list[str]:
    """Write ``texts`` (file name -> contents) into the run directory ``out``; with
    ``update_results`` copy them and the files ``written`` there already into
    ``experiments/results/``. Prints where they went; returns every name."""
    for name, text in texts.items():
        if name.endswith(".json"):  # every result says which versions and machine made it
            obj = json.loads(text)
            if isinstance(obj, dict) and "stack" not in obj:
                text = json.dumps({**obj, "stack": stack_record()}, indent=1)
        (out / name).write_text(text)
    names = [*written, *texts]
    if update_results:
        run_dir.publish(out, names)
    print(f"wrote {', '.join(names)} to {out}", flush=True)
    return names


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB', 123456789 -> '118 MiB'; three significant figures, binary units.

    None (a size that was not measured) -> '-'.
    """
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


def matmul_flops(batch: int, dim: int, opts: dict) -> float:
    """Matmul FLOPs of the tiled loss's forward + backward (the dense one: 6·B²·D cross)."""
    cross = 8.0  # forward tile, recomputed tile, dx and dy products: 4 × 2·B²·D
    intra = 0.0
    if opts.get("intra_view"):
        # x·x (and y·y when symmetric): forward, recompute, one gradient product each.
        intra = 6.0 * (2 if opts.get("symmetric", True) else 1)
    return (cross + intra) * batch * batch * dim


def unit_embeddings(batch: int, dim: int, sharding: Any = None) -> tuple[jax.Array, jax.Array]:
    """Unit-norm x (B, D) and a noisy positive y (B, D), float32, seeded by ``batch``."""
    kx, ky = jax.random.split(jax.random.key(batch))
    x = jax.random.normal(kx, (batch, dim), jnp.float32)
    y = x + 0.5 * jax.random.normal(ky, (batch, dim), jnp.float32)
    x, y = (a / jnp.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    return (x, y) if sharding is None else tuple(jax.device_put(a, sharding) for a in (x, y))


def loss_grad_fn(method: str, loss: str, mesh: Any, block_size: int | None = None) -> Callable:
    """``jax.jit(value_and_grad(loss, argnums=(0, 1)))`` of one method; x, y global (B, D).

    ``dense``: ``losses.reference``; ``tiled``: ``losses.<loss>``; ``ring``:
    ``losses.sharded`` over ``mesh``'s ``"data"`` axis; ``gathered``: ``losses.gathered``
    inside ``shard_map`` (the all-gather baseline).
    """
    if loss not in HYPER:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_NAMES)}")
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
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(LOSS_METHODS)}")
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
