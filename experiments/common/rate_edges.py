"""The batch-size study's rate-edge check: is a rate chosen at an end of the tuning grid the best?

A tuned study (``--tune``, ``--full``) chooses, per (loss, B, target), the rate of its grid
with the fewest steps to the target on its tuning seed. A rate chosen at the grid's lowest or
highest value says only that the best rate lies there or beyond, so the steps reported for
that cell are an upper bound. ``--stage rate-edges --rates STUDY.json`` measures how loose:
for each such choice it trains the tuning seed one grid step beyond that end (the end rate
divided, or multiplied, by the ratio of the grid's two rates at that end: 2 for the default
factors), under the study's own settings (checked against its recorded protocol, the training
set size read from it) and the study's step cap for (loss, B), and trains the end rate again
beside it: the runs are deterministic on one machine and software stack, but a run's curve on
another one parts from the committed run's within a few evaluations (as two seeds do), so the
comparison is between two runs of the same environment. The study's own steps at the end are
reported beside them.

Protocol, fixed before its first run. The stage was added after the full grid had run, to
measure the caveat its report states ("the steps at an end of the grid are upper bounds"); it
does not change the study's choices, tables or fits:

- cells: every (loss, B, target) of the study whose chosen rate is the lowest or the highest
  of that batch size's tuning rates (``--losses`` and ``--batch-sizes`` narrow them);
- runs: one per (loss, B, rate beyond) and one per (loss, B, end rate), the study's tuning
  seed, its cap for (loss, B), a stop at the study's highest target, evaluation on the
  study's schedule;
- verdict per cell: **beyond is faster** when the run beyond reaches the target in fewer
  steps than the end's run of this stage (the study's figure is then loose by about that
  ratio), otherwise **the end holds** (the rate beyond is slower, equal, or misses the target
  within the cap).

One seed and one grid step: a rate two steps beyond may be faster still, and a seed's steps
vary by tens of per cent (the study's min–max), so a small difference is within noise.

>>> beyond_rate([1e-3, 2e-3, 4e-3], "low"), beyond_rate([1e-3, 2e-3, 4e-3], "high")
(0.0005, 0.008)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError
from experiments.common import run_dir
from experiments.common.budget import check_rates_protocol
from experiments.common.cli import shared_module
from experiments.common.grid import compile_cache
from experiments.common.reports import loss_label, write_json
from experiments.common.study import StudyRun, run_to_target, time_line

__all__ = ["beyond_rate", "edge_cells", "edge_report", "run_rate_edges"]


def beyond_rate(rates: Sequence[float], side: str) -> float:
    """One grid step past the ``side`` ("low" or "high") end of the sorted ``rates``."""
    lo, hi = (rates[0], rates[1]) if side == "low" else (rates[-1], rates[-2])
    return lo * (lo / hi)


def _load_study(path: str) -> dict:
    try:
        study = json.loads(Path(path).read_text())
        study["summary"], study["rows"], study["targets"], study["protocol"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--rates {path}: not a finished study ({type(e).__name__}); give the JSON of a "
            "--tune or --full study"
        ) from None
    if not any(r.get("stage") == "tune" for r in study["rows"]):
        raise ConfigError(
            f"--rates {path} has no tuning runs (it ran at given rates): give the JSON of a "
            "--tune or --full study"
        )
    return study


def edge_cells(study: dict) -> list[dict]:
    """Per (loss, B, target) of ``study`` whose chosen rate is an end of that batch size's
    tuning rates: the grid, the end (``side``), the study's steps at it (its tuning run), the
    rate one grid step beyond, and the cap. Batch sizes with one tuning rate have no end."""
    tune: dict[tuple[str, int], list[dict]] = {}
    for r in study["rows"]:
        if r["stage"] == "tune":
            tune.setdefault((r["loss"], r["batch_size"]), []).append(r)
    cells = []
    for p in study["summary"]:
        runs = tune.get((p["loss"], p["batch_size"]), [])
        rates = sorted(r["learning_rate"] for r in runs)
        lr = p["learning_rate"]
        if lr is None or len(rates) < 2:
            continue
        ends = {"low": rates[0], "high": rates[-1]}
        side = next((k for k, end in ends.items() if math.isclose(lr, end)), None)
        if side is None:
            continue
        at = next(r for r in runs if math.isclose(r["learning_rate"], lr))
        cells.append({
            "loss": p["loss"], "batch_size": p["batch_size"], "target": p["target"],
            "grid": rates, "side": side, "learning_rate": lr,
            "steps": at["steps_to"][str(p["target"])], "seed": at["seed"],
            "beyond": beyond_rate(rates, side), "cap": max(r["cap"] for r in runs),
        })  # fmt: skip
    return cells


def _verdicts(cells: Sequence[dict], rows: Sequence[dict]) -> list[dict]:
    """Each cell with the steps of this stage's runs at the end and beyond, and the verdict."""

    def steps(c: dict, lr: float) -> int | None:
        (row,) = [r for r in rows if (r["loss"], r["batch_size"]) == (c["loss"], c["batch_size"])
                  and math.isclose(r["learning_rate"], lr)]  # fmt: skip
        return row["steps_to"].get(str(c["target"]))

    out = []
    for c in cells:
        end, s = steps(c, c["learning_rate"]), steps(c, c["beyond"])
        faster = s is not None and (end is None or s < end)
        out.append({**c, "end_steps": end, "beyond_steps": s, "beyond_faster": faster,
                    "ratio": end / s if faster and end else None})  # fmt: skip
    return out


def edge_report(record: dict) -> str:
    """The stage's Markdown: protocol, one row per cell, the tally."""
    cells, n_choices = record["summary"], record["choices"]
    lines = [
        "## Rates chosen at an end of the tuning grid, one grid step beyond "
        f"(`{record['rates_file']}`)",
        "",
        f"- cells: the {len(cells)} of the study's {n_choices} chosen rates (loss, B, target) "
        "that are the lowest or the highest rate it tried at that batch size",
        f"- runs: the tuning seed ({record['seed']}) at the end and one grid step beyond it, "
        "the study's cap and settings; \"in the study\": the study's own run at the end",
        f"- `{record['metric']}` on the validation split; steps are the first evaluation at "
        "or above the target",
        "",
        "| loss | batch | target | rates tried | chosen (end) | steps in the study | steps now "
        "| beyond | steps now | verdict |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        grid = ", ".join(f"{r:.2g}" for r in c["grid"])
        got = {k: c[k] if c[k] is not None else f"not in {c['cap']}"
               for k in ("end_steps", "beyond_steps")}  # fmt: skip
        verdict = "the end holds"
        if c["beyond_faster"]:
            verdict = f"beyond is faster ({c['ratio']:.2f}x)" if c["ratio"] else "beyond only"
        lines.append(
            f"| {loss_label(c['loss'])} | {c['batch_size']} | {c['target']:g} | {grid} | "
            f"{c['learning_rate']:.2g} ({c['side']}) | {c['steps']} | {got['end_steps']} | "
            f"{c['beyond']:.2g} | {got['beyond_steps']} | {verdict} |"
        )
    faster = [c for c in cells if c["beyond_faster"]]
    ratios = sorted(c["ratio"] for c in faster if c["ratio"])  # "beyond only" has none
    by = ""
    if ratios:
        by = f" (by {ratios[0]:.2f}x)" if len(ratios) == 1 else (
            f" (by {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")  # fmt: skip
    lines += ["", f"Beyond is faster in {len(faster)} of {len(cells)} cells{by}; the end "
              f"holds in {len(cells) - len(faster)}."]  # fmt: skip
    lines.append("\n" + time_line(record))
    return "\n".join(lines) + "\n"


def run_rate_edges(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    base_config: Callable[[argparse.Namespace, int, Path], Config],
) -> dict:
    """``--stage rate-edges`` of the study command: ``args`` its parsed flags (``targets``
    already a list), ``base_config(args, n_train, out)`` the settings every study run shares.
    Writes ``<study>_rate_edges.{json,md}``, named after the ``--rates`` file checked."""
    study = _load_study(args.rates)
    missing = [t for t in args.targets if t not in study["targets"]]
    if missing:
        raise ConfigError(
            f"--targets {','.join(map(str, missing))}: the study {args.rates} measured only "
            f"{','.join(map(str, study['targets']))}"
        )
    n_train = args.train_examples or study["protocol"].get("--train-examples")
    try:
        base = base_config(args, n_train, Path(args.out or "."))
    except ConfigError as e:
        raise ConfigError(str(e).replace("--stop-at", "--metric")) from None
    check_rates_protocol(args.rates, base)
    sizes = set(args.batch_sizes or [p["batch_size"] for p in study["summary"]])

    def asked(p: dict) -> bool:  # a (loss, B, target) the flags ask about
        return p["loss"] in args.losses and p["batch_size"] in sizes and p["target"] in args.targets

    cells = [c for c in edge_cells(study) if asked(c)]
    choices = sum(p["learning_rate"] is not None and asked(p) for p in study["summary"])
    seed = next(r["seed"] for r in study["rows"] if r["stage"] == "tune")
    wanted = {(c["loss"], c["batch_size"], lr): c["cap"]
              for c in cells for lr in (c["learning_rate"], c["beyond"])}  # fmt: skip

    def runs_at(out: Path) -> list[StudyRun]:
        b = base_config(args, n_train, out)
        return [
            StudyRun("edge", loss, bs, lr, seed, b.with_updates(
                loss=loss, batch_size=bs, learning_rate=lr, seed=seed, steps=cap,
                checkpoint_every=cap))
            for (loss, bs, lr), cap in sorted(wanted.items())
        ]  # fmt: skip

    runs_at(Path(args.out or "."))  # every run's config checked before the directory exists
    name = f"{Path(args.rates).stem}_rate_edges"
    out = run_dir.create(name, args.out)
    print(f"run directory: {out}", file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "command": " ".join(["python -m experiments.batch_size_study", *(argv or sys.argv[1:])]),
        "stage": args.stage, "rates_file": args.rates, "metric": args.metric,
        "targets": args.targets, "seed": seed, "protocol": base.identity(),
        "choices": choices,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }  # fmt: skip
    t_start = time.perf_counter()
    rows: list[dict] = []
    runs = runs_at(out)
    with compile_cache(args.compile_cache or out / "compile_cache"):
        for i, run in enumerate(runs, 1):
            rows.append(run_to_target(run, out, args.metric, args.targets, f"{i}/{len(runs)}"))
            write_json(out / f"{name}.json", {**record, "rows": rows})
    record.update(rows=rows, summary=_verdicts(cells, rows))
    record["total_time_s"] = round(time.perf_counter() - t_start, 1)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(out / f"{name}.json", record)
    text = edge_report(record)
    (out / f"{name}.md").write_text(text)
    if args.update_results:
        run_dir.publish(out, [f"{name}.{ext}" for ext in ("json", "md")])
    print(text)
    print(f"run directory: {out}")
    return record


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
