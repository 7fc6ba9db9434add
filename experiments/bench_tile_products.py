"""The backward tile's column product Gᵀ·a, in the two forms XLA can be given.

The engine's backward forms, per tile, ``G · b`` for the row gradient and ``Gᵀ · a`` for
the column gradient. Written as a contraction over the tile's row axis into a ``(t, D)``
result, the second runs markedly slower on XLA:CPU than the product ``aᵀ · G`` of the
anchor block transposed (once per row of tiles) into a ``(D, t)`` result, turned
afterwards; ``losses/_tiles.py`` uses the latter. This times both, side by side, in a loop
of tiles like the engine's (each iteration depends on the last, so nothing is hoisted).

    python -m experiments.bench_tile_products            # t = 1024, D = 256

Writes ``bench_tile_products.json`` into a run directory (``--out``, default
``runs/bench_tile_products-<time>/``; ``--update-results`` also copies it to
``experiments/results/``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from experiments.common import run_dir
from experiments.common.benchmarking import median_seconds, save_outputs
from experiments.common.cli import command_parser, positive_int, run_main

F32 = jnp.float32
STEM = "bench_tile_products"


def _dot(a, b, contract):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32)


def backward_tiles(form: str, tile: int, dim: int, count: int):
    """A jitted loop of ``count`` backward tiles: ``s = a·bᵀ``, ``G = sigmoid(s)``,
    ``G · b`` and ``Gᵀ · a`` in the given ``form`` ("row-contraction" or "transposed")."""

    def step(_, carry):
        a, b, d_a, d_b = carry
        s = _dot(a + 1e-30 * d_a[:1, :1], b, ((1,), (1,)))  # (t, D) · (D, t) -> (t, t)
        g = jax.nn.sigmoid(s)
        d_a = d_a + _dot(g, b, ((1,), (0,)))  # (t, t) · (t, D) -> (t, D)
        if form == "row-contraction":
            d_b = d_b + _dot(g, a, ((0,), (0,)))  # (t, t)ᵀ · (t, D) -> (t, D)
        else:
            g_t_a = _dot(a.T, g, ((1,), (0,)))  # (D, t) · (t, t) -> (D, t)
            d_b = d_b + lax.optimization_barrier(g_t_a).T
        return a, b, d_a, d_b

    def run(a, b):
        zeros = jnp.zeros((tile, dim), F32)
        return lax.fori_loop(0, count, step, (a, b, zeros, zeros))[2:]

    return jax.jit(run)


def run(argv: Sequence[str] | None = None) -> dict:
    p = command_parser("python -m experiments.bench_tile_products", __doc__)
    p.add_argument("--tile", type=positive_int, default=1024, help="tile edge t")
    p.add_argument("--dim", type=positive_int, default=256, help="embedding dimension D")
    p.add_argument("--count", type=positive_int, default=16, help="tiles per timed call")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed calls of each form; the median is reported")  # fmt: skip
    run_dir.add_output_flags(p)
    args = p.parse_args(argv)
    out = run_dir.create(STEM, args.out)

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (args.tile, args.dim), F32) / args.dim**0.5
    b = jax.random.normal(kb, (args.tile, args.dim), F32) / args.dim**0.5
    forms = ["row-contraction", "transposed"]
    fns = [backward_tiles(f, args.tile, args.dim, args.count) for f in forms]
    outs = [f(a, b) for f in fns]
    err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(*outs, strict=True))
    times = median_seconds(fns, a, b, repeats=args.repeats)
    flops = 3 * 2 * args.tile**2 * args.dim * args.count  # three products per tile
    result = {"max_abs_difference": err}
    for form, t in zip(forms, times, strict=True):
        result[form] = {"ms_per_tile": 1e3 * t / args.count, "gflops": flops / t / 1e9}
        print(f"{form:16s} {1e3 * t / args.count:7.2f} ms per tile  {flops / t / 1e9:6.1f} GFLOP/s")
    ratio = times[1] / times[0]
    print(f"transposed / row-contraction time: {ratio:.2f}; outputs differ by {err:.1e}")
    result["transposed_over_row_contraction"] = ratio
    result["config"] = vars(args)
    texts = {f"{STEM}.json": json.dumps(result, indent=1)}
    save_outputs(out, texts, update_results=args.update_results)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
