"""Statistics, tables, plots and files of a grid of runs: what every sweep reports the same way.

Per-seed results reduce to ``mean``, sample standard deviation (``std``, ``n - 1`` in the
denominator; ``0`` for one seed), ``min`` and ``max`` per (loss, batch size)
(:func:`summarise`); they are written as Markdown tables (mean ± std), a PNG with ±1 std
error bars, a CSV of every run and a JSON file.

>>> rows = [{"loss": "infonce", "batch_size": 32, "seed": s, "acc": a}
...         for s, a in enumerate([0.5, 0.6, 0.7])]
>>> (point,) = summarise(rows, ["acc"])
>>> point["acc"]["mean"], round(point["acc"]["std"], 3), point["acc"]["values"]
(0.6, 0.1, [0.5, 0.6, 0.7])
>>> mean_std(point["acc"])
'60.0 ± 10.0'
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from contrastive.loss_registry import LOSSES
from experiments.common.cli import shared_module


def loss_label(name: str) -> str:
    """The loss's label for tables and plots (its name if it is not a registered loss)."""
    return LOSSES[name].label if name in LOSSES else name


def statistics(values: Sequence[float | None]) -> dict[str, Any] | None:
    """``mean``, sample ``std`` (n - 1; 0 for one value), ``min``, ``max`` of the values
    that are not None (runs that diverged are None); ``values`` lists them all, in order.
    None if every value is None."""
    done = [v for v in values if v is not None]
    if not done:
        return None
    n = len(done)
    mean = sum(done) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in done) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(done), "max": max(done), "values": list(values)}


def summarise(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """One entry per (loss, batch size), in first-seen order: its seeds, the seeds whose run
    failed, and each metric's :func:`statistics` over the seeds (``values`` in seed order)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["batch_size"]), []).append(r)
    points = []
    for (loss, b), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        point = {"loss": loss, "batch_size": b, "seeds": [r["seed"] for r in rs]}
        point["failed_seeds"] = [r["seed"] for r in rs if r.get("error")]
        point.update({m: statistics([r[m] for r in rs]) for m in metrics})
        points.append(point)
    return points


def mean_std(stat: dict[str, Any], scale: float = 100.0) -> str:
    """``"mean ± std"`` of a :func:`statistics` entry, in percent by default."""
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def table_cell(point: dict | None, metric: str) -> str:
    """``mean ± std`` in percent, saying how many seeds it rests on when not all finished."""
    if point is None:
        return "-"
    stat, failed = point[metric], point.get("failed_seeds", [])
    if stat is None:
        return "diverged"
    text = mean_std(stat)
    if failed:
        text += f" ({len(failed)} of {len(point['seeds'])} diverged)"
    elif len(point["seeds"]) == 1:
        text += " (1 seed)"
    return text


def markdown_table(
    points: Sequence[dict],
    metric: str,
    losses: Sequence[str],
    columns: dict[str, Callable[[int], str]] | None = None,
) -> str:
    """Batch sizes down; ``columns`` (name -> text for a batch size), then one column per
    loss with the metric's mean ± std in percent (``-`` where no run finished)."""
    columns = columns or {}
    cell = {(p["loss"], p["batch_size"]): p for p in points}
    sizes = sorted({p["batch_size"] for p in points})
    head = ["batch", *columns, *(loss_label(x) for x in losses)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in sizes:
        vals = [str(b), *(f(b) for f in columns.values())]
        for loss in losses:
            p = cell.get((loss, b))
            vals.append(table_cell(p, metric))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_error_bars(
    points: Sequence[dict],
    panels: Sequence[tuple[str, str]],
    losses: Sequence[str],
    path: str | os.PathLike,
    title: str,
    baseline: dict[str, float] | None = None,
) -> None:
    """One panel per ``(metric, axis label)``: mean vs batch size (log₂ axis), one line per
    loss, error bars ±1 sample std over the seeds; ``baseline[metric]`` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels, strict=True):
        for k, loss in enumerate(losses):
            ps = sorted(
                (p for p in points if p["loss"] == loss and p[metric] is not None),
                key=lambda p: p["batch_size"],
            )
            if not ps:
                continue
            # Nudge each loss sideways a little so that overlapping error bars stay readable.
            xs = [p["batch_size"] * 2 ** (0.06 * (k - (len(losses) - 1) / 2)) for p in ps]
            ax.errorbar(
                xs,
                [100 * p[metric]["mean"] for p in ps],
                yerr=[100 * p[metric]["std"] for p in ps],
                marker="o",
                capsize=3,
                label=loss_label(loss),
            )
        if baseline is not None and metric in baseline:
            ax.axhline(100 * baseline[metric], color="grey", ls="--", label="untrained")
        ax.set_xscale("log", base=2)
        sizes = sorted({p["batch_size"] for p in points})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + " (mean ± 1 std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Every run as one CSV row (the union of the rows' keys as columns)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, written to a temporary file first (never half a file)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command that ran, for the JSON record."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


# The distributions whose versions decide a result (the train extra and what it pins down).
STACK_PACKAGES = (
    "jax", "jaxlib", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint",
    "numpy", "scipy", "scikit-learn", "grain", "array-record", "tensorflow-datasets",
    "ml-dtypes", "pillow",
)  # fmt: skip


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def stack_record(*, devices: bool = True) -> dict[str, Any]:
    """What produced a result: Python, the versions of :data:`STACK_PACKAGES` (None when
    not installed), the OS, the CPU model and core count, and (``devices=True``, which
    starts jax's backend: call it after ``simulate_cpu_devices``) the default backend,
    its device kind and count. Put it in every result file as ``"stack"``."""
    import importlib.metadata
    import platform

    packages = {}
    for name in STACK_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    record: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": packages,
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if devices:
        import jax

        devs = jax.devices()
        record |= {
            "backend": jax.default_backend(),
            "device_kind": devs[0].device_kind,
            "device_count": len(devs),
        }
    return record


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
