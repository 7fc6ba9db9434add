"""Reporting for the memory sweep: the Markdown tables, the plot and the output files.

``experiments/sweep_memory.py`` measures (compile only, XLA's memory analysis) and hands
its rows to :func:`write_report`, which writes ``memory_sweep.{csv,json,md,png}`` into the
run directory and returns the Markdown. Rows are dicts with ``loss``, ``method``,
``devices``, ``batch``, ``temp_bytes``, ``total_bytes``, ``extrapolated``, ``time_s``;
``fits`` the largest batch under the budget per method.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from experiments.common.benchmarking import GiB, fmt_batch, fmt_bytes
from experiments.common.cli import shared_module
from experiments.common.reports import stack_record

STEM = "memory_sweep"


def markdown(rows: list[dict], fits: list[dict], args: argparse.Namespace, meta: dict) -> str:
    """The tables: temporaries, totals, times (where timed) and the largest batches."""
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
        "**Temporaries + inputs + outputs per device** (`temp + argument + output − alias`: "
        "a donated train state written in place is counted once)",
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


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Per-device temporaries and totals against B, log-log; dashed: extrapolated B²."""
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


def write_report(
    rows: list[dict], fits: list[dict], args: argparse.Namespace, meta: dict, out: Path
) -> tuple[str, list[str]]:
    """Write ``memory_sweep.{csv,json,md[,png]}`` into ``out``: (Markdown, file names)."""
    names = [f"{STEM}.csv", f"{STEM}.json", f"{STEM}.md"]
    with open(out / names[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"meta": meta, "config": config, "rows": rows, "largest_batch": fits,
           "stack": stack_record()}  # fmt: skip
    (out / names[1]).write_text(json.dumps(doc, indent=1))
    md = markdown(rows, fits, args, meta)
    (out / names[2]).write_text(md)
    if not args.no_plot:
        plot(rows, args, out / f"{STEM}.png")
        names.append(f"{STEM}.png")
    return md, names


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
