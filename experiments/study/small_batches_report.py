"""The small-batches stage's report (:mod:`experiments.study.small_batches`): its rules'
settings, the rates, steps and examples to each target with the matched InfoNCE batch, the
final accuracy, the verdicts and the headline on "small batch does not harm performance"."""

from __future__ import annotations

from typing import Any

from experiments.study import protocol as P
from experiments.study.harness import time_line
from experiments.study.small_batches import ARM_LABELS, ARMS

__all__ = ["headline", "small_batches_markdown"]


def headline(record: dict) -> list[str]:
    """Rule 6's line on "small batch does not harm performance", per small ``B``."""
    large = record["large_batch"]
    by = {(v["what"], v["arm"], v["batch_size"], v["against"]): v["answer"]
          for v in record["verdicts"] if v["what"] == "accuracy"}  # fmt: skip
    lines = []
    for b in record["batch_sizes"]:
        gap = by.get(("accuracy", "infonce", b, f"InfoNCE at B = {large}"))
        sog = by.get(("accuracy", "sogclr", b, f"InfoNCE at B = {large}"))
        if gap is None or sog is None:
            continue
        small_harms = gap == "worse"
        sog_harmed = sog == "worse"
        if small_harms and not sog_harmed:
            where = "lies above" if sog == "better" else "overlaps"
            text = (f"reproduces at B = {b}: InfoNCE at {b} ends below InfoNCE at {large} and "
                    f"SogCLR at {b} does not (its interval {where} the large batch's)")  # fmt: skip
        elif sog_harmed:
            text = f"does not reproduce at B = {b}: SogCLR at {b} ends below InfoNCE at {large}"
        else:
            text = (f"not tested at B = {b}: InfoNCE at {b} does not end below InfoNCE at "
                    f"{large} here ({gap}), so there is no gap for SogCLR to close; SogCLR "
                    f"against InfoNCE at {large}: {sog}")  # fmt: skip
        lines.append(text)
    return lines


def _iv(x: dict | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if not x or x.get("interval") is None:
        return "-"
    lo, hi = x["interval"]
    return f"[{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"


def _match_text(m: Any) -> str:
    if m is None:
        return "-"
    if isinstance(m, dict):
        return f"{m['bound']} {m['of']}"
    return f"≈ {m:.0f}"


def small_batches_markdown(record: dict) -> str:
    """The stage's report: protocol, rates, steps and examples to each target with the
    matched InfoNCE batch, the final accuracy, the verdicts and the headline."""
    large, summary = record["large_batch"], record["summary"]
    lines = [
        "## Small batches that optimise the global objective (SogCLR, iSogCLR)",
        "",
        f"Rules: `experiments/study/small_batches.py` (fixed before its runs). Arms at B = "
        f"{', '.join(map(str, record['batch_sizes']))}; InfoNCE also at B = {large}; a budget "
        f"of {record['budget_examples']:,} examples per run; seeds "
        f"{', '.join(map(str, record['seeds']))} (the tuning seed 0 is not in the means); "
        f"90 % seed-bootstrap intervals. Queue: {record['queue_negatives']} candidates per "
        f"anchor. iSogCLR: ρ = {record['isogclr']['rho']:g}, η_τ = "
        f"{record['isogclr']['temperature_lr']:g}.",
        "",
        "Rates (learning rate; tuned on seed 0 for the harder target, or the committed study's):",
        "",
    ]
    harder = min(record["targets"])
    for r in record["rates"]:
        how = ("committed" if r["from"] == "committed"
               else f"tuned, 2^{r['exponent']} of the rule's, grid {r['grid']}, "
               f"{r['end_status']}")  # fmt: skip
        if r.get("chosen_for") not in (None, harder):
            how += f"; no rate reached {harder:g} within the cap: chosen for {r['chosen_for']:g}"
        lines.append(f"- {ARM_LABELS[r['arm']]}, B = {r['batch_size']}: "
                     f"{r['learning_rate']:.3g} ({how})")  # fmt: skip
    for r in record.get("left_out", []):
        lines.append(f"- {ARM_LABELS[r['arm']]}, B = {r['batch_size']}: no rate of the grid "
                     f"{r['grid']} reached either target within the cap: left out")  # fmt: skip
    match_by = {(m["target"], m["arm"], m["batch_size"]): m["matched_batch"]
                for m in record["steps_matches"]}  # fmt: skip
    for t in record["targets"]:
        lines += ["", f"Steps after warm-up to {P.METRIC} <= {t:g}: geometric mean [90 %], "
                  "examples (steps x B), and the InfoNCE batch with as many steps (committed "
                  "study):", "", "| arm | batch | steps [90 %] | examples | InfoNCE B with "
                  "as many steps |", "|---|---:|---|---:|---|"]  # fmt: skip
        for p in sorted(summary, key=lambda p: (p["batch_size"], ARMS.index(p["arm"]))):
            st = p["steps"][str(t)]
            if st.get("geomean") is None:
                steps = f"{st['missed']} of {len(p['seeds'])} seeds never reached it"
                ex = "-"
            else:
                steps = f"{st['geomean']:.0f} {_iv(st)}"
                ex = f"{st['examples']:,.0f}"
            m = match_by.get((float(t), p["arm"], p["batch_size"]))
            lines.append(f"| {ARM_LABELS[p['arm']]} | {p['batch_size']} | {steps} | {ex} | "
                         f"{_match_text(m)} |")  # fmt: skip
    acc_by = {(m["arm"], m["batch_size"]): m["matched_batch"] for m in record["accuracy_matches"]}
    lines += ["", "Final test zero-shot top-1 after the budget, % (mean [90 %]); the InfoNCE "
              "batch with that accuracy (this stage's InfoNCE runs):", "",
              "| arm | batch | steps | top-1 [90 %] | InfoNCE B with that top-1 |",
              "|---|---:|---:|---|---|"]  # fmt: skip
    for p in sorted(summary, key=lambda p: (p["batch_size"], ARMS.index(p["arm"]))):
        a = p.get("accuracy")
        acc = "-" if a is None else f"{100 * a['mean']:.1f} {_iv(a, '{:.1f}', 100.0)}"
        m = acc_by.get((p["arm"], p["batch_size"]))
        steps = record["budget_examples"] // p["batch_size"]
        lines.append(f"| {ARM_LABELS[p['arm']]} | {p['batch_size']} | {steps} | {acc} | "
                     f"{_match_text(m) if p['arm'] != 'infonce' else ''} |")  # fmt: skip
    lines += ["", "Verdicts (only where 90 % intervals separate):", ""]
    for v in record["verdicts"]:
        what = f"steps to {v['target']:g}" if v["what"] == "steps" else "final top-1"
        lines.append(f"- {ARM_LABELS[v['arm']]} at B = {v['batch_size']}, {what}, against "
                     f"{v['against']}: {v['answer']}")  # fmt: skip
    lines += ["", "**Small batch does not harm performance (Yuan et al. 2022)?** "
              + "; ".join(headline(record) or ["no comparison finished"]) + "."]  # fmt: skip
    runs = [*record["rows"], *record.get("tuning", [])]
    lines.append("\n" + time_line(runs, record.get("call_time_s", 0)))
    return "\n".join(lines) + "\n"
