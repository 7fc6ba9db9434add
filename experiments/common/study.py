"""The machinery of the batch-size study: runs to a target, learning-rate choice, the report.

A study run is one :class:`~contrastive.configs.Config` trained by
:func:`contrastive.loop.train` until its validation metric first reaches the highest target
(``--stop-at``) or its step cap; the loop evaluates on a geometric schedule
(``--eval-growth``), so the first step at which each target is reached is known to a few
per cent. Every run keeps its own work dir inside the study's run directory; a finished one
is read back, not trained again, so a study cut short resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive.configs import Config, ConfigError
from contrastive.data.pipeline import get_spec, metric_names
from contrastive.loop import RunError, train
from experiments.common.cli import shared_module
from experiments.common.reports import loss_label, statistics
from experiments.common.scaling import first_crossing, fit_critical_batch, model_steps

__all__ = [
    "StudyRun",
    "StudyStopped",
    "run_to_target",
    "choose_rates",
    "chosen_rates",
    "steps_summary",
    "fits",
    "noise_scales",
    "steps_table",
    "plot_steps",
    "time_line",
]


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of the study: its coordinates and the config it trains."""

    stage: str  # "tune", "seeds", "budget" or an arm's ("queue-k15", "hard-c16-r256")
    loss: str
    batch_size: int
    learning_rate: float
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return (
            f"{self.stage}_{self.loss}_b{self.batch_size}_lr{self.learning_rate:.3g}_s{self.seed}"
        )


class StudyStopped(Exception):
    """A run of the study was stopped by a signal before its last step (it saved a
    checkpoint): the study stops too, and the same command resumes it."""


def run_to_target(
    run: StudyRun, root: Path, metric: str, targets: Sequence[float], index: str
) -> dict[str, Any]:
    """Train (or read back) ``run`` in ``root/runs/<name>``; its row: steps to each target
    (None: not reached within the cap), the final metrics (every metric of the last
    evaluation, test and validation, also under ``final``), the validation curve, the noise
    scale measurements, the batches' hard negatives and re-clustering share (``measures``),
    the wall time."""
    cfg = run.config.with_updates(workdir=str(root / "runs" / run.name))
    t0 = time.perf_counter()
    print(f"[{index}] {run.name}: cap {cfg.steps} steps", file=sys.stderr, flush=True)
    row: dict[str, Any] = {
        "stage": run.stage,
        "loss": run.loss,
        "batch_size": run.batch_size,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "cap": cfg.steps,
    }
    try:
        records = train(cfg)
    except RunError as e:  # diverged: no target reached, said so
        row.update(error=str(e), steps_to={str(t): None for t in targets}, curve=[])
        print(f"[{index}] {run.name}: failed: {e}", file=sys.stderr)
        return row
    last = records[-1] if records else {}
    if last.get("step", 0) < cfg.steps and "reached_target" not in last:
        raise StudyStopped(
            f"[{index}] {run.name} stopped before its last step ({cfg.steps}) by SIGTERM or "
            "SIGINT, its checkpoint saved: run the same command with the same --out to resume"
        )
    evals = [r for r in records if metric in r]
    steps, values = [r["step"] for r in evals], [r[metric] for r in evals]
    row["curve"] = [[s, v] for s, v in zip(steps, values, strict=True)]
    row["steps_to"] = {str(t): first_crossing(steps, values, t) for t in targets}
    final = records[-1] if records else {}
    row["final_step"] = final.get("step")
    row.update({k: final[k] for k in ("zero_shot_top1", "zero_shot_top1_novel") if k in final})
    spec = get_spec(cfg.data.dataset, cfg.data.image_size)
    names = metric_names(spec, validation=bool(cfg.data.validation_examples))
    row["final"] = {k: final[k] for k in names if k in final}
    row["measures"] = _negatives_and_refresh(records, cfg)
    row["noise_b_simple"] = [
        [r["step"], r["noise_b_simple"]] for r in records if "noise_b_simple" in r
    ]
    row["time_s"] = round(time.perf_counter() - t0, 1)  # reading a finished run back: seconds
    # The run's own training time from its log (the same whether trained now or read back).
    row["train_s"] = final.get("elapsed_s")
    reached = ", ".join(f"{t}: {s}" for t, s in row["steps_to"].items())
    print(f"[{index}] {run.name}: steps to target {{{reached}}} ({row['time_s']} s)",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def _negatives_and_refresh(records: Sequence[dict], cfg: Config) -> dict[str, float]:
    """What the arms of the study compare besides accuracy: ``hard_negatives`` (batch-mates
    one attribute away per anchor, logged on ``shapes``) averaged over the logged steps of
    the run's last epoch, where the hard arm's batches are clustered (its first epoch is
    random); and ``refresh_share``, the hard batches' re-clustering time as a share of the
    run's wall time (evaluations included) at its last logged step."""
    out: dict[str, float] = {}
    logged = [r for r in records if "hard_negatives" in r]
    if logged:
        n = cfg.data.train_examples
        epoch = max(1, n // cfg.run.batch_size) if n else len(records)
        last = [r["hard_negatives"] for r in logged if r["step"] > logged[-1]["step"] - epoch]
        out["hard_negatives"] = sum(last) / len(last)
    timed = [r for r in records if "refresh_total_s" in r and r.get("elapsed_s")]
    if timed:
        out["refresh_share"] = timed[-1]["refresh_total_s"] / timed[-1]["elapsed_s"]
    return out


def choose_rates(rows: Sequence[dict], targets: Sequence[float]) -> dict[tuple, float | None]:
    """The learning rate with the fewest steps to each target, per (loss, batch, target),
    from the tuning rows (one seed; ties go to the smaller rate). None: no rate reached it."""
    best: dict[tuple, tuple[int, float] | None] = {}
    for r in rows:
        if r["stage"] != "tune":
            continue
        for t in targets:
            key = (r["loss"], r["batch_size"], t)
            s = r["steps_to"].get(str(t))
            best.setdefault(key, None)
            if s is not None and (best[key] is None or (s, r["learning_rate"]) < best[key]):
                best[key] = (s, r["learning_rate"])
    return {k: (None if v is None else v[1]) for k, v in best.items()}


def steps_summary(
    rows: Sequence[dict], rates: dict[tuple, float | None], targets: Sequence[float]
) -> list[dict]:
    """Per (loss, batch, target): the chosen rate and the steps of every seed run at it
    (tuning's seed included), with their statistics; a seed that did not reach the target
    within its cap counts as not reached (never dropped)."""
    out = []
    for (loss, b, t), lr in rates.items():
        runs = [
            r
            for r in rows
            if r["stage"] in ("tune", "seeds")
            and (r["loss"], r["batch_size"]) == (loss, b)
            and lr is not None
            and math.isclose(r["learning_rate"], lr)
        ]
        runs.sort(key=lambda r: r["seed"])
        steps = [r["steps_to"].get(str(t)) for r in runs]
        cap = max((r["cap"] for r in rows if (r["loss"], r["batch_size"]) == (loss, b)), default=0)
        out.append(
            {
                "loss": loss,
                "batch_size": b,
                "target": t,
                "learning_rate": lr,
                "seeds": [r["seed"] for r in runs],
                "steps": steps,
                "not_reached": sum(s is None for s in steps) if runs else None,
                "cap": cap,
                "stats": statistics(steps) if runs else None,
            }
        )
    return out


def fits(summary: Sequence[dict], losses: Sequence[str], targets: Sequence[float]) -> list[dict]:
    """McCandlish's fit per (loss, target) on the seed-mean steps of the batch sizes where
    every seed reached the target."""
    out = []
    for loss in losses:
        for t in targets:
            pts = [
                p
                for p in summary
                if p["loss"] == loss and p["target"] == t and p["stats"] and not p["not_reached"]
            ]
            pts.sort(key=lambda p: p["batch_size"])
            entry = {"loss": loss, "target": t, "batch_sizes": [p["batch_size"] for p in pts]}
            if len(pts) >= 2:
                entry.update(
                    fit_critical_batch(
                        [p["batch_size"] for p in pts], [p["stats"]["mean"] for p in pts]
                    )
                )
            out.append(entry)
    return out


def _cell(p: dict | None) -> str:
    if p is None or p["learning_rate"] is None:
        return "not reached"
    st = p["stats"]
    if st is None:
        return "-"
    text = f"{st['mean']:.0f} ({st['min']:.0f}–{st['max']:.0f})"
    if p["not_reached"]:
        text += f", {p['not_reached']} of {len(p['steps'])} not within {p['cap']}"
    return text


def steps_table(summary: Sequence[dict], losses: Sequence[str], target: float) -> str:
    """Markdown: batch sizes down, one column per loss: mean steps (min–max over seeds) to
    ``target``, and the chosen learning rate."""
    cell = {(p["loss"], p["batch_size"]): p for p in summary if p["target"] == target}
    sizes = sorted({b for _, b in cell})
    head = ["batch", *(f"{loss_label(x)}: steps (LR)" for x in losses)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in sizes:
        vals = [str(b)]
        for loss in losses:
            p = cell.get((loss, b))
            lr = "" if p is None or p["learning_rate"] is None else f" ({p['learning_rate']:.2g})"
            vals.append(_cell(p) + lr)
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_steps(
    summary: Sequence[dict],
    fit_rows: Sequence[dict],
    losses: Sequence[str],
    targets: Sequence[float],
    path: Path,
    title: str,
) -> None:
    """Log-log steps to target against batch size, one panel per target: seed means with
    min–max bars, the fitted ``S_min (1 + B_noise / B)`` and the perfect-scaling line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for k, loss in enumerate(losses):
            pts = sorted(
                (p for p in summary if p["loss"] == loss and p["target"] == t and p["stats"]),
                key=lambda p: p["batch_size"],
            )
            if not pts:
                continue
            b = [p["batch_size"] for p in pts]
            mean = [p["stats"]["mean"] for p in pts]
            err = [
                [m - p["stats"]["min"] for m, p in zip(mean, pts, strict=True)],
                [p["stats"]["max"] - m for m, p in zip(mean, pts, strict=True)],
            ]
            line = ax.errorbar(b, mean, yerr=err, marker="o", capsize=3, label=loss_label(loss))
            colour = line[0].get_color()
            # Perfect scaling from the smallest batch: S halves when B doubles.
            ax.plot(b, [mean[0] * b[0] / x for x in b], ls=":", color=colour, alpha=0.6)
            fit = next((f for f in fit_rows if f["loss"] == loss and f["target"] == t), None)
            if fit and fit.get("s_min") is not None:
                grid = [b[0] * (b[-1] / b[0]) ** (i / 50) for i in range(51)]
                ax.plot(grid, [model_steps(fit, x) for x in grid], ls="--", color=colour,
                        alpha=0.8, label=f"fit, B_crit {fit['b_crit']:.0f}")  # fmt: skip
            del k
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(f"steps to validation zero-shot top-1 ≥ {t:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title + " (dotted: perfect scaling; dashed: McCandlish fit)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chosen_rates(
    path: str | Path,
    losses: Sequence[str],
    sizes: Sequence[int],
    targets: Sequence[float] | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(loss, B): {"learning_rate", "target", "cap"}}`` from a finished study's JSON: the
    rate chosen for the highest of ``targets`` (default: the study's own) that one of its
    rates reached, that target, and the batch size's step cap. ConfigError (one line) if the
    file is not a finished study or lacks a (loss, B)."""
    try:
        study = json.loads(Path(path).read_text())
        summary, rows = study["summary"], study["rows"]
        targets = study["targets"] if targets is None else targets
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--rates {path}: not a finished study ({type(e).__name__}); run with --tune to "
            "choose the rates first"
        ) from None
    out = {}
    for loss in losses:
        for b in sizes:
            points = [p for p in summary if (p["loss"], p["batch_size"]) == (loss, b)]
            chosen = [
                p
                for p in sorted(points, key=lambda p: -p["target"])
                if p["learning_rate"] and p["target"] in targets
            ]
            caps = [r["cap"] for r in rows if (r["loss"], r["batch_size"]) == (loss, b)]
            if not chosen or not caps:
                raise ConfigError(
                    f"--rates {path} has no chosen rate for {loss} at B = {b}: run with --tune"
                )
            out[(loss, b)] = {
                "learning_rate": chosen[0]["learning_rate"],
                "target": chosen[0]["target"],
                "cap": max(caps),
            }
    return out


def noise_scales(rows: Sequence[dict]) -> list[dict]:
    """B_simple per (loss, batch): early (first measurement), middle and last, seed mean."""
    out: dict[tuple, list] = {}
    for r in rows:
        if r.get("noise_b_simple"):
            out.setdefault((r["loss"], r["batch_size"]), []).append(r["noise_b_simple"])
    result = []
    for (loss, b), series in sorted(out.items()):
        pick = lambda s, i: s[min(i, len(s) - 1)][1] if s else None
        first = [pick(s, 0) for s in series]
        mid = [pick(s, len(s) // 2) for s in series]
        last = [pick(s, len(s) - 1) for s in series]
        mean = lambda v: sum(v) / len(v)
        result.append({"loss": loss, "batch_size": b, "first": mean(first),
                       "middle": mean(mid), "last": mean(last), "runs": len(series)})  # fmt: skip
    return result


def study_report(
    record: dict, summary: list, fit_rows: list, noise: list, targets: Sequence[float]
) -> str:
    """The tuned study's (or the main job's) Markdown report: protocol, steps tables, fits
    beside the noise scale."""
    lines = ["## Steps to target against batch size (shapes, locked image tower)", ""]
    lines.append(f"- metric: `{record['metric']}`; targets {', '.join(map(str, targets))}")
    lines.append(f"- learning-rate grid: {record['lr_factors']} x 4e-3 * sqrt(B / 256); "
                 "chosen per (loss, B, target) on seed 0's validation curve")  # fmt: skip
    lines.append(f"- seeds {record['seeds']}; steps as mean (min–max) over seeds")
    fixed = ", ".join(f"`{k} {v}`" for k, v in record["protocol"].items()
                      if k not in ("--loss", "--batch-size", "--learning-rate", "--seed",
                                   "--steps"))  # fmt: skip
    lines.append(f"- the same in every run: {fixed}")
    for t in targets:
        lines += ["", f"Steps to {record['metric']} >= {t:g}:", ""]
        lines.append(steps_table(summary, record["losses"], t))
    lines += ["", "McCandlish fit `S = S_min (1 + B_noise / B)` on the seed means "
              "(batch sizes where every seed reached the target):", ""]  # fmt: skip
    lines += ["| loss | target | S_min | E_min | B_crit | rel. rms residual | points |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for f in fit_rows:

        def num(k, f=f):
            return "-" if f.get(k) is None else f"{f[k]:.3g}"

        lines.append(
            f"| {loss_label(f['loss'])} | {f['target']:g} | {num('s_min')} | {num('e_min')} | "
            f"{num('b_crit')} | {num('relative_rms_residual')} | {len(f['batch_sizes'])} |"
        )
    if noise:
        lines += ["", "Gradient noise scale B_simple measured in the seed runs (mean over "
                  "seeds; first, middle and last measurement of each run):", ""]  # fmt: skip
        lines += ["| loss | batch | first | middle | last |", "|---|---:|---:|---:|---:|"]
        for n in noise:
            lines.append(f"| {loss_label(n['loss'])} | {n['batch_size']} | {n['first']:.3g} | "
                         f"{n['middle']:.3g} | {n['last']:.3g} |")  # fmt: skip
    lines.append("\n" + time_line(record))
    return "\n".join(lines) + "\n"


def time_line(record: dict) -> str:
    """The report's last line: this call's time, and the runs' own training time summed from
    their logs (a call that reads finished runs back takes seconds; their training did not)."""
    trained = [r["train_s"] for r in record.get("rows", ()) if r.get("train_s") is not None]
    line = f"Total time of this call {record.get('total_time_s', 0) / 60:.1f} min"
    if not trained:
        return line + "."
    return (f"{line}; the runs' own training time, summed from their logs, "
            f"{sum(trained) / 60:.1f} min ({len(trained)} runs).")  # fmt: skip


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
