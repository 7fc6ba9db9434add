"""A check of the GPU/TPU claims in a few minutes: loss speed, planner memory, streamed step.

``python -m experiments.device_check`` runs on ``jax.devices()[0]`` and writes one report,
``device_check.{json,md}``, into the run directory it prints. Three measurements, in this
order (the memory one first, while the device's peak-memory counter is still fresh):

1. **Planner against the device** (:mod:`experiments.plan`). The planner sizes the largest
   global batch of a small CLIP train step (gradient-cached, one device) that fits
   ``--plan-memory`` from XLA:CPU's buffer assignment, compile only, exactly as the
   committed plan does. That step is then built for real on the device at the planned
   batch and run once; ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` is the
   measured peak, to set against the predicted per-device bytes (temporaries + arguments
   + outputs − aliased). The device's own compiler's ``memory_analysis()`` of the same
   step is reported beside them. A CPU has no ``memory_stats()``: "not available".
2. **Tiled losses** (:mod:`losses`: infonce, sigmoid, decoupled), ``value_and_grad`` with
   respect to x and y at B up to 262,144 (256k) pairs, D = 768, in bfloat16 and float32.
   Each loss's rate counts the tiled algorithm's matmul FLOPs, ``8·B²·D`` (forward tile,
   recomputed tile, dx and dy products: Inf-CL, Cheng et al. 2024), against a plain
   ``n³`` matmul of the same dtype timed in the same process (``2·n³`` FLOPs): the share
   of the device's matmul rate. The dense reference (``losses.reference``, ``6·B²·D``)
   runs beside it where its compiled program fits the device's free memory. A case whose
   time, extrapolated as ``B²`` from the previous size, would not fit what is left of
   the check's ``--budget-s`` (less a reserve for part 3) is skipped and says so.
3. **Streamed against in-memory step** (:mod:`experiments.bench_streamed`: the gradient
   cache of Gao et al. 2021 reading each chunk from host arrays twice, prefetch on and
   off, against the step given the whole batch), the median seconds and their ratio.

On a CPU (or with ``--reduced``) every size shrinks so that the whole check runs in well
under a minute; that is what CI runs. On one H100 the full size takes about 5 minutes
(``--budget-s``, default 450 s, bounds the whole check: the loss part gets what the
planner left, less a reserve for the streamed part).

    python -m experiments.device_check                  # full size on a GPU, reduced on CPU
    python -m experiments.device_check --reduced --out /tmp/dc

The measurements are :mod:`experiments.common.device_measures`; this module is the command,
its report and the Markdown. Every report records the package versions and the machine
(:func:`experiments.common.reports.stack_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from experiments.common import run_dir
from experiments.common.cli import command_parser, positive_float, run_main
from experiments.common.device_measures import (
    DTYPES,
    FULL,
    LOSS_NAMES,
    REDUCED,
    Sizes,
    check_planner,
    check_streamed,
    time_losses,
)

# The sizes and the loss timing are read here by tests and callers: handed on.
__all__ = ["DTYPES", "FULL", "LOSS_NAMES", "REDUCED", "Sizes", "time_losses", "markdown",
           "run", "main"]  # fmt: skip

STEM = "device_check"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = command_parser(f"python -m experiments.{STEM}", __doc__)
    p.add_argument(
        "--reduced",
        action="store_true",
        help="the CPU size (automatic when the default backend is the CPU)",
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=450.0,
        help="seconds for the whole check: a loss case that would overrun it (less a reserve "
        "for the streamed part) is skipped",
    )
    p.add_argument(
        "--plan-memory", default=None, help="the planner's per-device limit (default: per size)"
    )
    run_dir.add_output_flags(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------- report


def _bytes(n: float | None) -> str:
    from experiments.common.benchmarking import fmt_bytes

    return fmt_bytes(n)


def _planner_md(p: dict) -> list[str]:
    lines = [
        f"{p['model']}, gradient-cached train step (chunk {p['chunk_size']}), one device, "
        f"limit {_bytes(p['memory_limit_bytes'])}: planned global batch {p['planned_batch']} "
        f"({p['planner_compiles']} compiles, {p['planner_s']} s).",
    ]
    if p["planned_batch"] is None:
        return [*lines, "", p.get("note", "")]
    measured, ratio = p.get("measured_peak_bytes"), p.get("measured_over_predicted")
    return [
        *lines,
        "",
        "| predicted peak (XLA:CPU, planner) | device compiler's total | measured peak "
        "(memory_stats) | measured / predicted | loss finite |",
        "|---:|---:|---:|---:|---|",
        f"| {_bytes(p['predicted_peak_bytes'])} | {_bytes(p.get('device_compiled_bytes'))} | "
        + (_bytes(measured) if measured is not None else "not available")
        + f" | {'-' if ratio is None else f'{ratio:.2f}'} | {p.get('loss_finite')} |",
    ]


def _losses_md(matmul: dict, rows: list[dict]) -> list[str]:
    lines = [
        "Matmul rate in this process: "
        + "; ".join(f"{d} {r['tflops']:.3g} TFLOP/s ({r['n']}³)" for d, r in matmul.items())
        + ". Share = the loss's matmul FLOPs per second (tiled 8·B²·D, dense 6·B²·D) over "
        "the rate of the same dtype.",
        "",
        "| B | D | dtype | loss | tiled s | tiled TFLOP/s | tiled share | dense s "
        "| dense share | tiled/dense |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['batch']} | {r['dim']} | {r['dtype']} | {r['loss']} |"
        if "skipped" in r:
            lines.append(head + f" skipped: {r['skipped']} | | | | | |")
            continue
        dense = (
            [f"{r['dense_s']:.4f}", f"{100 * r['dense_share_of_matmul']:.0f}%",
             f"{r['tiled_over_dense']:.2f}"]
            if "dense_s" in r
            else [r["dense"], "-", "-"]
        )  # fmt: skip
        lines.append(
            head
            + f" {r['tiled_s']:.4f} | {r['tiled_tflops']:.3g} | "
            + f"{100 * r['tiled_share_of_matmul']:.0f}% | "
            + " | ".join(dense)
            + " |"
        )
    return lines


def _streamed_md(st: dict) -> list[str]:
    lines = [
        f"`python -m experiments.bench_streamed {' '.join(st['flags'])}`",
        "",
        "| step | median s | vs in-memory |",
        "|---|---:|---:|",
    ]
    for r in st["rows"]:
        lines.append(f"| {r['step']} | {r['median_s']:.4f} | {r['vs_in_memory']:.2f} |")
    t = st["target"]
    verdict = "met" if t["met"] else "not met"
    return [
        *lines,
        "",
        f"Target (issue 19): streamed with prefetch at most "
        f"{t['streamed_over_in_memory_at_most']}x the in-memory step: {t['ratio']:.2f}x, "
        f"{verdict}.",
    ]


def markdown(report: dict) -> str:
    """The report as Markdown: the machine, then one section per measurement (or the one
    line of the error that stopped it)."""
    s = report["stack"]
    packages = ", ".join(f"{k} {v}" for k, v in s["packages"].items() if v)
    lines = [
        f"# Device check ({'reduced' if report['reduced'] else 'full'} size)",
        "",
        f"Device: {s.get('device_kind')} ({s.get('backend')}, {s.get('device_count')} "
        f"device(s)); CPU: {s['cpu']} ({s['cpu_count']} cores); Python {s['python']}; "
        f"{packages}. Took {report['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in report['section_seconds'].items())}).",
    ]
    parts = {
        "planner": ("Planner against the device", lambda: _planner_md(report["planner"])),
        "losses": (
            "Tiled losses, forward + backward",
            lambda: _losses_md(report["matmul"], report["losses"]),
        ),
        "streamed": ("Streamed step against the in-memory one",
                     lambda: _streamed_md(report["streamed"])),
    }  # fmt: skip
    for name, (title, body) in parts.items():
        lines += ["", f"## {title}", ""]
        if name in report["errors"]:
            lines.append(f"Failed: {report['errors'][name]}")
        else:
            lines += body()
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    from experiments.common.planning import parse_bytes

    if args.plan_memory is not None:  # a bad size is one line, before any work
        try:
            parse_bytes(args.plan_memory)
        except ValueError as e:
            raise ValueError(str(e).replace("--memory", "--plan-memory", 1)) from None
    out = run_dir.create(STEM, args.out)
    start = time.perf_counter()

    import jax

    from experiments.common.reports import stack_record, write_json

    device = jax.devices()[0]
    reduced = args.reduced or device.platform == "cpu"
    sizes = REDUCED if reduced else FULL
    print(f"device check on {device.device_kind} ({'reduced' if reduced else 'full'} size)")
    report: dict[str, Any] = {
        "command": " ".join([f"python -m experiments.{STEM}", *(argv or sys.argv[1:])]),
        "reduced": reduced,
        "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))),  # as the file has them
        "stack": stack_record(),
    }
    sections = {
        "planner": lambda: check_planner(sizes, args.plan_memory or sizes.plan_memory, device),
        "losses": lambda: time_losses(
            sizes, device, args.budget_s - sizes.streamed_reserve_s - (time.perf_counter() - start)
        ),
        "streamed": lambda: check_streamed(sizes, out),
    }
    report["section_seconds"], report["section_cpu_seconds"], report["errors"] = {}, {}, {}
    for name, fn in sections.items():
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = fn()
        except Exception as e:  # one failed part must not cost the others on a borrowed GPU
            traceback.print_exc()
            report["errors"][name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            result = None
        report["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        report["section_cpu_seconds"][name] = round(time.process_time() - c0, 1)
        if name == "losses":
            report["matmul"], report["losses"] = result or ({}, [])
        else:
            report[name] = result
        print(f"{name}: {report['section_seconds'][name]} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = markdown(report)
    write_json(out / f"{STEM}.json", report)
    (out / f"{STEM}.md").write_text(text)
    print(text)
    if args.update_results:
        run_dir.publish(out, [f"{STEM}.json", f"{STEM}.md"])
    print(f"run directory: {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
