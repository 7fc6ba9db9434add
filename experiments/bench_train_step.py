"""The train step's time on simulated devices, against the step of an earlier revision.

``python -m experiments.bench_train_step`` times the gradient-cached and the plain train
step (two-view MLP tower, InfoNCE ring loss, AdamW) of this checkout beside the same steps
of ``--baseline`` (a git revision; default ``c95d6ba``, the last one whose cached step
all-reduced the parameter gradients once per chunk), in one process on ``--devices``
simulated CPU devices, calls alternating. Also the step with the optimiser state sharded
(``shard_optimizer=True``). Medians of ``--repeats`` rounds; the ratio is what to read (the
simulated devices share the host's cores, so absolute times are host totals).

Writes ``bench_train_step.{json,md}`` into the run directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from experiments import benchmarking as bm
from experiments import run_dir

REPO = Path(__file__).resolve().parents[1]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_train_step", description=__doc__)
    p.add_argument("--baseline", default="c95d6ba", help="git revision to compare against")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=512, help="global rows per chunk")
    p.add_argument("--width", type=int, default=512, help="MLP tower width")
    p.add_argument("--input-dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    run_dir.add_output_flags(p)
    return p.parse_args(argv)


def _baseline_train_step(revision: str):
    """``contrastive/train_step.py`` of ``revision`` as a module (on today's other modules)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:contrastive/train_step.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_train_step.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_train_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    bm.simulate_cpu_devices(args.devices)
    out = run_dir.create("bench_train_step", args.out)

    import jax
    from flax import nnx

    from contrastive import mesh as mesh_lib
    from contrastive import models, optim
    from contrastive import train_step as current

    baseline = _baseline_train_step(args.baseline)
    mesh = mesh_lib.make_mesh(num_devices=args.devices)
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (args.batch, args.input_dim))
    y = x + 0.1 * jax.random.normal(k2, x.shape)
    batch = mesh_lib.shard_batch((x, y), mesh)
    oc = optim.OptimConfig(learning_rate=1e-4, total_steps=1000)

    def build(ts, chunk, **extra):
        rngs = nnx.Rngs(0)
        tower = models.MLPEncoder(args.input_dim, args.width, 2, rngs=rngs)
        model = models.DualEncoder(tower, embed_dim=128, head_hidden=args.width, rngs=rngs)
        cfg = ts.TrainConfig(loss=ts.LossConfig("infonce"), optim=oc, chunk_size=chunk, **extra)
        graphdef, state = ts.create_train_state(model, optim.make_optimizer(oc))
        if extra.get("shard_optimizer"):
            state = current.place_state(state, mesh, shard_optimizer=True)
        else:
            state = mesh_lib.place_params(state, mesh)
        step = ts.make_train_step(graphdef, cfg, mesh, donate=False)
        return lambda: step(state, batch, None)

    cases = {
        ("cached", "baseline"): build(baseline, args.chunk),
        ("cached", "current"): build(current, args.chunk),
        ("cached", "current, sharded optimiser"): build(current, args.chunk, shard_optimizer=True),
        ("plain", "baseline"): build(baseline, None),
        ("plain", "current"): build(current, None),
    }
    seconds = bm.median_seconds(list(cases.values()), repeats=args.repeats)
    times = dict(zip(cases, seconds, strict=True))
    rows = []
    for (step, version), t in times.items():
        base = times[(step, "baseline")]
        rows.append({"step": step, "version": version, "median_s": t, "vs_baseline": t / base})
    summary = {
        "command": "python -m experiments.bench_train_step",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_results")},
        "rows": rows,
    }
    table = [
        f"Train step, {args.devices} simulated CPU devices, B = {args.batch}, chunk "
        f"{args.chunk}, MLP width {args.width}; baseline = {args.baseline}; medians of "
        f"{args.repeats} alternating rounds.",
        "",
        "| step | version | median s | vs baseline |",
        "|---|---|---:|---:|",
        *(
            f"| {r['step']} | {r['version']} | {r['median_s']:.3f} | {r['vs_baseline']:.2f} |"
            for r in rows
        ),
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


if __name__ == "__main__":
    main()
