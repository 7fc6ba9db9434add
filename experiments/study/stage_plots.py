"""Plots of the batch-size study's fixed-budget and arms stages (PNG, matplotlib Agg).

:func:`plot_budget`: the final test zero-shot top-1 against the batch size at a fixed budget
of examples (SimCLR's Fig. 9, SigLIP's Fig. 2), seed means with min–max bars, and each
loss's validation curves against the examples seen. :func:`plot_arms`: steps to each target
against the batch size on log-log axes, the random arm's curve with the arms' points on it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common.cli import shared_module
from experiments.common.reports import loss_label

__all__ = ["plot_budget", "plot_arms"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(points: Sequence[dict], key, scale: float = 1.0):
    """x, mean and the min–max error bars of statistics entries ``key(p)``."""
    x = [p["batch_size"] for p in points]
    mean = [scale * key(p)["mean"] for p in points]
    err = [
        [m - scale * key(p)["min"] for m, p in zip(mean, points, strict=True)],
        [scale * key(p)["max"] - m for m, p in zip(mean, points, strict=True)],
    ]
    return x, mean, err


def _mean_curve(rows: Sequence[dict]) -> tuple[list[int], list[float]]:
    """The seed mean of validation curves at the steps every run evaluated (the geometric
    schedule is the same for every seed)."""
    curves = [dict((s, v) for s, v in r["curve"]) for r in rows if r.get("curve")]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def plot_budget(record: dict, path: Path) -> None:
    """Left: final test top-1 (%) against B per loss; then per loss the seed-mean validation
    curves against the examples seen (B · step), one line per batch size."""
    plt = _pyplot()
    losses = record["losses"]
    fig, axes = plt.subplots(1, 1 + len(losses), figsize=(4.6 * (1 + len(losses)), 4))
    ax = axes[0]
    for loss in losses:
        pts = sorted((p for p in record["summary"] if p["stage"] == "budget"
                      and p["loss"] == loss and p["zero_shot_top1"]),
                     key=lambda p: p["batch_size"])  # fmt: skip
        if pts:
            x, mean, err = _bars(pts, lambda p: p["zero_shot_top1"], 100.0)
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=loss_label(loss))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (pairs)")
    ax.set_ylabel("final test zero-shot top-1 (%)")
    ax.set_title(f"{record['budget_examples']:,} examples", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax, loss in zip(axes[1:], losses, strict=True):
        for b in sorted({r["batch_size"] for r in record["rows"]}):
            runs = [r for r in record["rows"] if r["stage"] == "budget"
                    and (r["loss"], r["batch_size"]) == (loss, b)]  # fmt: skip
            steps, mean = _mean_curve(runs)
            if steps:
                ax.plot([b * s for s in steps], [100 * v for v in mean], label=f"B = {b}")
        for t in record["targets"]:
            ax.axhline(100 * t, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training examples seen")
        ax.set_ylabel(f"{record['metric']} (%)")
        ax.set_title(loss_label(loss), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("shapes, locked image tower: a fixed budget of examples (mean, min–max bars)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_arms(record: dict, path: Path) -> None:
    """One panel per target: steps to it against B (log-log) for the random arm per loss
    (seed means, min–max bars), the arms' points in the same colour with their own markers."""
    plt = _pyplot()
    targets, summary = record["targets"], record["summary"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    markers = dict(zip(sorted({p["stage"] for p in summary if p["stage"] != "budget"}),
                       "s^vDP*", strict=False))  # fmt: skip
    for ax, t in zip(axes[0], targets, strict=True):
        key = lambda p, t=t: p["steps_to"][str(t)]
        for loss in record["losses"]:
            pts = sorted((p for p in summary if p["stage"] == "budget" and p["loss"] == loss
                          and key(p)), key=lambda p: p["batch_size"])  # fmt: skip
            colour = None
            if pts:
                x, mean, err = _bars(pts, key)
                line = ax.errorbar(x, mean, yerr=err, marker="o", capsize=3,
                                   label=f"{loss_label(loss)}, random")  # fmt: skip
                colour = line[0].get_color()
            for stage, marker in markers.items():
                arm = sorted((p for p in summary if p["stage"] == stage and p["loss"] == loss
                              and key(p)), key=lambda p: p["batch_size"])  # fmt: skip
                if arm:
                    x, mean, err = _bars(arm, key)
                    ax.errorbar(x, mean, yerr=err, marker=marker, ls="none", capsize=3,
                                color=colour, label=f"{loss_label(loss)}, {stage}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(f"steps to {record['metric']} ≥ {t:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("shapes, locked image tower: arms against random batches (mean, min–max)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
