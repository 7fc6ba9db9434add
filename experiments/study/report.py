"""The study's report: targets and margins, steps tables, fits with intervals, verdicts, plot.

Every number comes from the record that :mod:`experiments.study.steps_to_target` returns; a
verdict is written only where 90 % intervals separate (protocol item 9).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from experiments.common.reports import loss_label
from experiments.study import protocol as P
from experiments.study.fitting import model_steps

__all__ = ["study_markdown", "reproduction_markdown", "plot_study", "verdicts"]


def _n(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _iv(iv: Sequence[float] | None, fmt: str = ".3g") -> str:
    return "-" if not iv else f"[{format(iv[0], fmt)}, {format(iv[1], fmt)}]"


def _steps_cell(p: dict) -> str:
    if p["learning_rate"] is None:
        return "no rate reached it"
    if "geomean" in p:
        text = f"{p['geomean']:.0f} {_iv(p['interval'], '.0f')}"
    elif "lower_bound" in p:
        text = f">= {p['lower_bound']:.0f} ({p['censored']} of {len(p['steps'])} at cap {p['cap']})"
    else:
        text = "-"
    ru = p["runner_up"]
    rate = f"lr {p['learning_rate']:.2g} (2^{p['exponent']})"
    runner = "" if ru is None else f"; runner-up 2^{ru['exponent']}: {ru['steps']}"
    where = "" if p["end_status"] == "interior" else f"; {p['end_status']}"
    return f"{text}; {rate}; seed 0: {p['tuning_steps']}{runner}{where}"


def steps_table(summary: Sequence[dict], losses: Sequence[str], target: float) -> str:
    """Batch sizes down, losses across: geometric-mean steps after warm-up over the reported
    seeds with the 90 % interval, the chosen rate, the tuning seed's and the runner-up's."""
    cell = {(p["loss"], p["batch_size"]): p for p in summary if p["target"] == target}
    sizes = sorted({b for _, b in cell})
    head = ["batch", *(loss_label(x) for x in losses)]
    lines = ["| " + " | ".join(head) + " |", "|---:|" + "---|" * len(losses)]
    for b in sizes:
        vals = [str(b)] + [_steps_cell(cell[(x, b)]) if (x, b) in cell else "-" for x in losses]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def verdicts(summary: Sequence[dict], fits: Sequence[dict], losses: Sequence[str]) -> list[str]:
    """One line per comparison whose intervals separate, and a count of those that do not."""
    lines, unresolved = [], 0
    targets = sorted({p["target"] for p in summary})
    by = {(p["loss"], p["batch_size"], p["target"]): p for p in summary}
    for t in targets:
        sizes = sorted({p["batch_size"] for p in summary if p["target"] == t})
        for b in sizes:
            for a, c in itertools.combinations(losses, 2):
                pa, pc = by.get((a, b, t)), by.get((c, b, t))
                if not (pa and pc and pa.get("interval") and pc.get("interval")):
                    continue
                (alo, ahi), (clo, chi) = pa["interval"], pc["interval"]
                if ahi < clo or chi < alo:
                    fast, slow = (pa, pc) if ahi < clo else (pc, pa)
                    lines.append(
                        f"- target {t:g}, B = {b}: {loss_label(fast['loss'])} needs fewer steps "
                        f"than {loss_label(slow['loss'])} ({fast['geomean']:.0f} "
                        f"{_iv(fast['interval'], '.0f')} against {slow['geomean']:.0f} "
                        f"{_iv(slow['interval'], '.0f')})"
                    )
                else:
                    unresolved += 1
        for loss in losses:
            pts = sorted((p for p in summary if p["loss"] == loss and p["target"] == t
                          and p.get("interval")), key=lambda p: p["batch_size"])  # fmt: skip
            for lo, hi in itertools.pairwise(pts):
                if hi["interval"][1] < lo["interval"][0]:
                    lines.append(
                        f"- target {t:g}, {loss_label(loss)}: B = {lo['batch_size']} -> "
                        f"{hi['batch_size']} takes fewer steps ({lo['geomean']:.0f} -> "
                        f"{hi['geomean']:.0f}, {lo['geomean'] / hi['geomean']:.2f}x)"
                    )
                elif lo["interval"][1] < hi["interval"][0]:
                    lines.append(
                        f"- target {t:g}, {loss_label(loss)}: B = {lo['batch_size']} -> "
                        f"{hi['batch_size']} takes more steps ({lo['geomean']:.0f} -> "
                        f"{hi['geomean']:.0f})"
                    )
                else:
                    unresolved += 1
        done = [f for f in fits if f["target"] == t and f.get("b_crit_interval")
                and not f.get("b_crit_bound")]  # fmt: skip
        for f, g in itertools.combinations(done, 2):
            (flo, fhi), (glo, ghi) = f["b_crit_interval"], g["b_crit_interval"]
            if fhi < glo or ghi < flo:
                small, large = (f, g) if fhi < glo else (g, f)
                lines.append(
                    f"- target {t:g}: B_crit of {loss_label(small['loss'])} "
                    f"({small['b_crit']:.3g}) is below {loss_label(large['loss'])}'s "
                    f"({large['b_crit']:.3g})"
                )
            else:
                unresolved += 1
    lines.append(
        f"- not resolved at this precision (90 % intervals overlap): {unresolved} comparisons"
    )
    return lines


def study_markdown(record: dict) -> str:
    """The tuned study's report."""
    tgt, losses = record["targets"], record["losses"]
    targets = tgt["targets"]
    lines = ["## Steps to target against batch size (shapes, locked image tower)", ""]
    lines += [
        f"Protocol version {record['protocol_version']} (fixed before its first run: "
        "`experiments/study/__init__.py`).",
        f"- metric: `{P.METRIC}`, validation zero-shot cross-entropy among all 5,184 captions "
        f"at temperature 0.05, on all {P.VALIDATION_EXAMPLES} validation examples (nats, lower "
        f"is better); evaluated at the steps ceil({P.EVAL_GROWTH}^k); steps counted after "
        f"{P.WARMUP_STEPS} warm-up steps",
        f"- targets {', '.join(map(str, targets))} nats: the highest pilot plateau + "
        f"{P.MARGIN_SD:g} noise SDs, rounded up (set by {loss_label(tgt['binding']['loss'])} "
        f"at B = {tgt['binding']['batch_size']}), and that + {P.EASIER_OFFSET} nats",
        f"- rates: 2^k x 4e-3 sqrt(B / 256), k = {P.RATE_EXPONENTS[0]} .. "
        f"{P.RATE_EXPONENTS[-1]}, extended while the choice is at an end; chosen on seed "
        f"{P.TUNING_SEED}; reported: seeds {', '.join(map(str, record['seeds']))}",
        "- the same in every run: "
        + ", ".join(f"`{k} {v}`" for k, v in record["settings"].items()),
        "",
        "Pilot plateaus and margins (target - plateau) / noise SD:",
        "",
        "| loss | batch | plateau | noise SD | "
        + " | ".join(f"margin to {t:g}" for t in targets)
        + " | cap |",
        "|---|---:|---:|---:|" + "---:|" * len(targets) + "---:|",
    ]
    margin = {(m["loss"], m["batch_size"], m["target"]): m["margin_sd"] for m in tgt["margins"]}
    for c in tgt["plateaus"]:
        ms = " | ".join(f"{margin[(c['loss'], c['batch_size'], t)]:.1f}" for t in targets)
        lines.append(f"| {loss_label(c['loss'])} | {c['batch_size']} | {c['plateau']:.3f} | "
                     f"{c['noise_sd']:.4f} | {ms} | {c['cap']} |")  # fmt: skip
    for t in targets:
        lines += ["", f"Steps after warm-up to {P.METRIC} <= {t:g}: geometric mean over the "
                  "reported seeds [90 % seed-bootstrap interval]; the chosen rate; the tuning "
                  "seed's steps and the runner-up rate's:", ""]  # fmt: skip
        lines.append(steps_table(record["summary"], losses, t))
    lines += ["", "Fit `S = S_min + E_min / B` (least squares on log S; 90 % seed-bootstrap "
              "intervals; measured / model ratio per point, * beyond "
              f"{P.RESIDUAL_FLAG}x; censored cells as lower bounds):", "",
              "| loss | target | S_min | E_min | B_crit | ratios by B | describes the curve |",
              "|---|---:|---|---|---|---|---|"]  # fmt: skip
    for f in record["fits"]:
        if f.get("s_min") is None:
            lines.append(f"| {loss_label(f['loss'])} | {f['target']:g} | - | - | - | fewer than "
                         "two uncensored cells | - |")  # fmt: skip
            continue
        ratios = ", ".join(
            f"{p['batch_size']}: {p['ratio']:.2f}{'*' if p['flagged'] else ''}" for p in f["points"]
        )
        bounds = "".join(
            f"; {c['batch_size']}: >= {c['bound']:.0f} (model {c['model']:.0f}"
            f"{', contradicted' if c['contradicted'] else ''})"
            for c in f["censored"]
        )
        bc = f.get("b_crit_bound")
        b_crit = (
            f"{bc['side']} {bc['batch_size']} (not determined inside the grid)"
            if bc
            else f"{f['b_crit']:.3g} {_iv(f['b_crit_interval'])}"
        )
        lines.append(
            f"| {loss_label(f['loss'])} | {f['target']:g} | {f['s_min']:.3g} "
            f"{_iv(f['s_min_interval'])} | {f['e_min']:.3g} {_iv(f['e_min_interval'])} | "
            f"{b_crit} | {ratios}{bounds} | {'yes' if f['describes'] else 'no'} |"
        )
    lines += ["", "Verdicts (only where 90 % intervals separate):", ""]
    lines += verdicts(record["summary"], record["fits"], losses)
    lines += ["", time_line(record)]
    return "\n".join(lines) + "\n"


def reproduction_markdown(record: dict) -> str:
    """The main job's report: this call's seeds beside the committed ones, per cell."""
    t = record["target"]
    lines = [
        f"## The main job: the committed study's seed runs again, to {P.METRIC} <= {t:g}",
        "",
        f"Rates, caps and target from `{record['rates']}` (chosen there by tuning on seed "
        f"{P.TUNING_SEED}; this call tunes nothing). Seeds {', '.join(map(str, record['seeds']))}"
        f"; steps after {P.WARMUP_STEPS} warm-up steps, evaluations at ceil({P.EVAL_GROWTH}^k)."
        f" The metric: validation zero-shot cross-entropy among all captions (nats).",
        "",
        "| loss | batch | rate | committed steps | steps now | now / committed | z |",
        "|---|---:|---:|---|---|---:|---:|",
    ]

    def seeds(v: Sequence[int | None]) -> str:
        return ", ".join("cap" if x is None else str(x) for x in v)

    bad = []
    for c in record["comparison"]:
        lines.append(
            f"| {loss_label(c['loss'])} | {c['batch_size']} | {c['learning_rate']:.2g} | "
            f"{seeds(c['committed'])} | {seeds(c['now'])} | {c['ratio']:.2f} | {c['z']:+.1f} |"
        )
        if not c["within_noise"]:
            bad.append(f"{loss_label(c['loss'])} at B = {c['batch_size']}")
    lines += ["", "z: the difference of mean log steps in units of its standard error over "
              "seeds; within noise when |z| <= 3.", ""]  # fmt: skip
    if bad:
        lines.append(f"**Does not reproduce within noise:** {'; '.join(bad)}.")
    else:
        lines.append(f"**Reproduces within noise:** all {len(record['comparison'])} cells.")
    same = sum(c["identical"] for c in record["comparison"])
    lines.append(
        f"Seed by seed, {same} of {len(record['comparison'])} cells took exactly the committed "
        "steps (expected on the machine and pinned stack that made the committed study; "
        "elsewhere runs part by about the seeds' spread)."
    )
    lines += ["", time_line(record)]
    return "\n".join(lines) + "\n"


def time_line(record: dict) -> str:
    return (
        f"This call: {record.get('call_time_s', 0) / 60:.1f} min (runs already finished in its "
        f"--out are read back, not trained again); the runs' own training time (from their "
        f"logs): {record.get('train_time_s', 0) / 60:.1f} min."
    )


def plot_study(record: dict, path: Path) -> None:
    """Log-log steps against B, one panel per target: geometric means with 90 % intervals,
    censored cells as upward triangles, the fit dashed, perfect scaling dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = record["targets"]["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.6), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for loss in record["losses"]:
            pts = sorted((p for p in record["summary"] if p["loss"] == loss and p["target"] == t),
                         key=lambda p: p["batch_size"])  # fmt: skip
            full = [p for p in pts if "geomean" in p]
            if full:
                b = [p["batch_size"] for p in full]
                g = [p["geomean"] for p in full]
                err = [[x - p["interval"][0] for x, p in zip(g, full, strict=True)],
                       [p["interval"][1] - x for x, p in zip(g, full, strict=True)]]  # fmt: skip
                line = ax.errorbar(b, g, yerr=err, marker="o", capsize=3, label=loss_label(loss))
                colour = line[0].get_color()
                ax.plot(b, [g[0] * b[0] / x for x in b], ls=":", color=colour, alpha=0.5)
            else:
                colour = None
            bounds = [p for p in pts if "lower_bound" in p]
            if bounds:
                ax.scatter([p["batch_size"] for p in bounds], [p["lower_bound"] for p in bounds],
                           marker="^", color=colour)  # fmt: skip
            fit = next((f for f in record["fits"] if f["loss"] == loss and f["target"] == t), {})
            if fit.get("s_min") is not None and full and not fit.get("b_crit_bound"):
                lo, hi = full[0]["batch_size"], full[-1]["batch_size"]
                grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
                ax.plot(grid, [model_steps(fit, x) for x in grid], ls="--", color=colour,
                        alpha=0.8, label=f"fit: B_crit {fit['b_crit']:.3g}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(f"steps after warm-up to {P.METRIC} <= {t:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Steps to target (dotted: perfect scaling; dashed: fit; ^: censored)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
