"""Accuracy vs batch size for the InfoNCE (SimCLR), decoupled (DCL) and sigmoid (SigLIP) losses.

``python -m experiments.sweep_accuracy`` trains one encoder per (loss, batch size) for the
same number of epochs (so every run sees the same examples; larger batches take fewer,
larger steps, as in SimCLR's Fig. 9), runs a linear probe and k-NN on its frozen features
after each run, and evaluates the randomly initialised encoder as the no-training baseline.

Writes ``accuracy_sweep.{csv,json,md,png}`` to ``--out`` and prints the Markdown table.
The default (offline digits, tiny ResNet, batches 64/256/1024, 20 epochs) takes a few
minutes on a 2-core CPU; ``--dataset cifar10 --width 16 --batch-sizes 256,1024,4096
--epochs 100`` and friends give the full sizes (datasets prepared beforehand, see README).

Softmax losses use SimCLR's NT-Xent form (``intra_view``: 2B-2 negatives per anchor);
the learning rate scales as ``sqrt(B / 256)`` (the square-root rule for Adam-type
optimisers), warm-up is 10 % of the steps.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from tqdm import tqdm

from contrastive.data import get_spec, load_source
from experiments import train
from experiments.config import Config, ConfigError

LOSS_LABELS = {
    "infonce": "InfoNCE (SimCLR)",
    "decoupled": "decoupled (DCL)",
    "sigmoid": "sigmoid (SigLIP)",
}
STEM = "accuracy_sweep"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _strs(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep_accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--losses", type=_strs, default=["infonce", "decoupled", "sigmoid"])
    p.add_argument("--batch-sizes", type=_ints, default=[64, 256, 1024])
    p.add_argument("--epochs", type=float, default=20.0, help="passes over the training split")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3, help="at batch 256")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=10000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument(
        "--workdir", default=None, help="keep each run's checkpoints here (default: temporary)"
    )
    return p


def run_config(args: argparse.Namespace, loss: str, batch_size: int, workdir: str) -> Config:
    """The :class:`Config` of one run of the sweep."""
    n_train = len(load_source(args.dataset, get_spec(args.dataset).train_split, args.data_dir))
    steps = max(1, math.ceil(args.epochs * n_train / batch_size))
    return Config(
        workdir=workdir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        width=args.width,
        embed_dim=args.embed_dim,
        loss=loss,
        intra_view=loss != "sigmoid",
        steps=steps,
        batch_size=batch_size,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate * math.sqrt(batch_size / 256),
        warmup_steps=max(1, steps // 10),
        seed=args.seed,
        checkpoint_every=max(1, steps // 2),
        log_every=max(1, steps // 20),
        eval_examples=args.eval_examples,
        progress=False,
    )


def markdown_table(rows: list[dict], baseline: dict, losses: Sequence[str]) -> str:
    """Batch sizes down, losses across; cells: linear probe % (k-NN %)."""
    sizes = sorted({r["batch_size"] for r in rows})
    head = "| batch | " + " | ".join(LOSS_LABELS.get(x, x) for x in losses) + " |"
    lines = [head, "|---:|" + "---:|" * len(losses)]
    cell = {(r["loss"], r["batch_size"]): r for r in rows}
    for b in sizes:
        vals = []
        for loss in losses:
            r = cell.get((loss, b))
            vals.append(f"{100 * r['linear_probe']:.1f} ({100 * r['knn']:.1f})" if r else "-")
        lines.append(f"| {b} | " + " | ".join(vals) + " |")
    lines.append(
        f"| random encoder | {100 * baseline['linear_probe']:.1f} "
        f"({100 * baseline['knn']:.1f}) |" + " |" * (len(losses) - 1)
    )
    return "\n".join(lines)


def plot(rows: list[dict], baseline: dict, losses: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss in losses:
        rs = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["batch_size"])
        ax.plot(
            [r["batch_size"] for r in rs],
            [100 * r["linear_probe"] for r in rs],
            marker="o",
            label=LOSS_LABELS.get(loss, loss),
        )
    ax.axhline(100 * baseline["linear_probe"], color="grey", ls="--", label="random encoder")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (pairs)")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="sweep_accuracy_")
    t_start = time.perf_counter()
    runs = [(loss, b) for loss in args.losses for b in args.batch_sizes]
    try:
        # Validate every run before the first one starts (names first: no data needed).
        for loss in args.losses:
            Config(workdir=root, dataset=args.dataset, model=args.model, loss=loss).validate()
        configs = {
            (loss, b): run_config(args, loss, b, os.path.join(root, f"{loss}_b{b}"))
            for loss, b in runs
        }
        for cfg in configs.values():
            cfg.validate()
        t0 = time.perf_counter()
        baseline = train.evaluate_init(dataclasses.replace(next(iter(configs.values()))))
        baseline["time_s"] = round(time.perf_counter() - t0, 1)
        rows = []
        for loss, b in tqdm(runs, desc="sweep", unit="run"):
            cfg = configs[(loss, b)]
            t0 = time.perf_counter()
            final = train.run(cfg)[-1]
            rows.append(
                {
                    "loss": loss,
                    "batch_size": b,
                    "steps": cfg.steps,
                    "epochs": args.epochs,
                    "learning_rate": cfg.learning_rate,
                    "final_loss": final["loss"],
                    "temperature": final["temperature"],
                    "linear_probe": final["linear_probe"],
                    "knn": final["knn"],
                    "time_s": round(time.perf_counter() - t0, 1),
                }
            )
            tqdm.write(
                f"{loss:>9} B={b:<5} steps={cfg.steps:<4} probe={final['linear_probe']:.3f} "
                f"knn={final['knn']:.3f} ({rows[-1]['time_s']} s)"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, STEM)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = max(rows, key=lambda r: r["linear_probe"])
    total = round(time.perf_counter() - t_start, 1)
    summary = {
        "command": "python -m experiments.sweep_accuracy " + " ".join(argv or sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "random_encoder": baseline,
        "runs": rows,
        "best": best,
        "gain_over_random_points": round(
            100 * (best["linear_probe"] - baseline["linear_probe"]), 1
        ),
        "total_time_s": total,
    }
    with open(out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    title = f"{args.dataset}, {args.model} (width {args.width}), {args.epochs:g} epochs"
    plot(rows, baseline, args.losses, out + ".png", title)
    table = markdown_table(rows, baseline, args.losses)
    text = (
        f"Linear-probe accuracy % (k-NN % in brackets) on the {args.dataset} test split; "
        f"{title}.\n\n{table}\n\nBest: {LOSS_LABELS.get(best['loss'], best['loss'])} at batch "
        f"{best['batch_size']}, {summary['gain_over_random_points']:+.1f} points over the "
        f"random encoder. Total time {total:.0f} s.\n"
    )
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
