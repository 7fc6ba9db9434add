"""Dense vs tiled losses, forward + backward, side by side in one process.

For each batch size, loss and option: the median time of ``value_and_grad`` (x and y) of
the dense reference and of the tiled loss, their ratio, the tiled loss's effective rate
(counting the matmul FLOPs of the tiled algorithm, 8·B²·D for the cross-view tiles plus
the same-view tiles of ``intra_view``) against a plain 4096³ float32 matmul, and the
compiled temporary memory of both (compile only).

The three (tiled, dense, matmul) run in alternation, round after round, each after an
untimed matmul, and each ratio compares medians taken over the same rounds: on a shared
machine, load that comes and goes hits all three alike instead of whichever happened to
run at the time.

    python -m experiments.bench_losses                      # B = 2048 .. 16384, D = 256
    python -m experiments.bench_losses --batch 8192 16384 --repeats 5 --block-size 512

Writes ``bench_losses.{json,md}`` into a run directory (``--out``, default
``runs/bench_losses-<time>/``; ``--update-results`` also refreshes ``experiments/results/``)
and prints the table.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import losses
from experiments.common import run_dir
from experiments.common.benchmarking import (
    compiled_memory,
    matmul_flops,
    median_seconds,
    save_outputs,
)
from experiments.common.cli import command_parser, positive_int, run_main

CASES = [
    ("infonce", {}),
    ("infonce", {"symmetric": False}),
    ("infonce", {"intra_view": True}),
    ("sigmoid", {}),
    ("decoupled", {}),
    ("decoupled", {"sigma": 0.5}),
    ("decoupled", {"intra_view": True}),
]
STEM = "bench_losses"


def temp_mib(fn: Callable, *args: jax.Array) -> float:
    """Compiled temporaries of ``fn`` on arrays shaped like ``args``, in MiB (compile only)."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return compiled_memory(fn, *specs)["temp_bytes"] / 2**20


def reference_matmul(size: int) -> tuple[Callable, int]:
    """A jitted ``size``³ float32 matmul as a function of the benchmark's (x, y), and its
    FLOPs."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    return (lambda *_: mm(a, a)), 2 * size**3


TARGETS = "tiled/dense <= 1.0 at B >= 16384, <= 1.1 at B = 8192; >= 75% of matmul"


def meets_targets(row: dict) -> bool:
    """The issue's bounds for one row (only the rate bound below B = 8192)."""
    batch = row["batch"]
    bound = 1.0 if batch >= 16384 else 1.1 if batch >= 8192 else float("inf")
    return row["tiled_over_dense"] <= bound and row["fraction_of_matmul"] >= 0.75


def _parser():
    p = command_parser("python -m experiments.bench_losses", __doc__)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[2048, 4096, 8192, 16384],
                   help="batch sizes B (pairs), one row each")  # fmt: skip
    p.add_argument("--dim", type=positive_int, default=256, help="embedding dimension D")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="tile edge of the tiled losses (default: each loss's own)")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed rounds; the medians are reported")  # fmt: skip
    p.add_argument("--matmul-size", type=positive_int, default=4096,
                   help="n of the reference n³ float32 matmul")  # fmt: skip
    names = ", ".join(dict.fromkeys(name for name, _ in CASES))
    p.add_argument("--cases", default="all",
                   help=f"comma-separated loss names ({names}), or all")  # fmt: skip
    run_dir.add_output_flags(p)
    return p


def select_cases(text: str) -> list[tuple[str, dict]]:
    """The rows of :data:`CASES` that ``--cases`` names (``all``: every one); ValueError
    (one line, listing the known names) for an unknown or empty selection."""
    known = list(dict.fromkeys(name for name, _ in CASES))
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(CASES)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"--cases {text!r}: unknown case(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}, or all"
        )
    return [c for c in CASES if c[0] in names]


def run(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    cases = select_cases(args.cases)  # before the run directory: a bad name leaves nothing
    out = run_dir.create(STEM, args.out)

    matmul, reference_flops = reference_matmul(args.matmul_size)
    rows = []
    for batch in args.batch:
        kx, ky = jax.random.split(jax.random.key(batch))
        x = jax.random.normal(kx, (batch, args.dim), jnp.float32)
        y = x + 0.5 * jax.random.normal(ky, (batch, args.dim), jnp.float32)
        x, y = (a / jnp.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
        for name, opts in cases:
            tiled_loss = functools.partial(
                getattr(losses, name), block_size=args.block_size, **opts
            )
            dense_loss = functools.partial(getattr(losses.reference, name), **opts)
            tiled = jax.jit(jax.value_and_grad(tiled_loss, argnums=(0, 1)))
            dense = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))
            t_tiled, t_dense, t_matmul = median_seconds(
                [tiled, dense, matmul], x, y, repeats=args.repeats, settle=matmul
            )
            flops = matmul_flops(batch, args.dim, opts)
            peak = reference_flops / t_matmul
            row = {
                "batch": batch,
                "dim": args.dim,
                "loss": name + "".join(f" {k}={v}" for k, v in opts.items()),
                "dense_s": t_dense,
                "tiled_s": t_tiled,
                "tiled_over_dense": t_tiled / t_dense,
                "tiled_gflops": flops / t_tiled / 1e9,
                "matmul_gflops": peak / 1e9,
                "fraction_of_matmul": flops / t_tiled / peak,
                "dense_temp_mib": temp_mib(dense, x, y),
                "tiled_temp_mib": temp_mib(tiled, x, y),
            }
            row["meets_targets"] = meets_targets(row)
            rows.append(row)
            print(
                f"B={batch:6d} {row['loss']:34s} dense {t_dense:7.3f}s tiled {t_tiled:7.3f}s "
                f"ratio {row['tiled_over_dense']:.2f} {row['tiled_gflops']:6.1f} GFLOP/s "
                f"({100 * row['fraction_of_matmul']:.0f}% of {peak / 1e9:.0f}) temp "
                f"{row['dense_temp_mib']:.0f} / {row['tiled_temp_mib']:.1f} MiB",
                flush=True,
            )

    meta = {
        "device": jax.devices()[0].device_kind,
        "dim": args.dim,
        "repeats": args.repeats,
        "block_size": args.block_size,
        "matmul_size": args.matmul_size,
        "targets": TARGETS,
    }
    lines = [
        f"float32 on {meta['device']}, D = {args.dim}, medians of {args.repeats} alternating "
        f"rounds, against a {args.matmul_size}³ matmul. Targets: {TARGETS}.",
        "",
        "| B | loss | dense s | tiled s | tiled/dense | tiled GFLOP/s | matmul GFLOP/s "
        "| % of matmul | dense temp MiB | tiled temp MiB | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['loss']} | {r['dense_s']:.3f} | {r['tiled_s']:.3f} | "
            f"{r['tiled_over_dense']:.2f} | {r['tiled_gflops']:.1f} | "
            f"{r['matmul_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | "
            f"{r['dense_temp_mib']:.0f} | {r['tiled_temp_mib']:.1f} | "
            f"{'met' if r['meets_targets'] else 'MISSED'} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    texts = {
        f"{STEM}.json": json.dumps({"meta": meta, "rows": rows}, indent=1),
        f"{STEM}.md": table,
    }
    save_outputs(out, texts, update_results=args.update_results)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
