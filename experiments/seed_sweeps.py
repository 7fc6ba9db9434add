"""What the batch-size sweeps share: a grid of (loss, batch size, seed) runs, their statistics.

``experiments/sweep_accuracy.py`` (CLIP-style, ``shapes``) and ``experiments/sweep_digits.py``
(SimCLR-style, ``digits``) differ only in their data, budget and metrics; this module

- holds their common flags (:func:`add_grid_flags`) and builds one
  :class:`experiments.config.Config` per (seed, batch size, loss), with the one
  learning-rate rule of both: AdamW at ``base_lr · sqrt(B / 256)`` (square-root scaling,
  Malladi et al. 2022), warm-up over ⌊steps / 10⌋ steps, cosine decay (:func:`grid_runs`),
- checks every configuration before the first run starts (:func:`check_lists`,
  :func:`check_runs`: a bad one is one :class:`~experiments.config.ConfigError` line),
- trains them one after another through :func:`experiments.train.run` (:func:`run_grid`),
  each in its own workdir inside the run directory, with a line before and after every run
  and the run's own progress bar while it trains; a workdir that holds a finished run is
  read back, not trained again, so a sweep cut short resumes where it stopped,
- reduces the per-seed results to ``mean``, sample standard deviation (``std``, ``n - 1``
  in the denominator; ``0`` for one seed), ``min`` and ``max`` per (loss, batch size)
  (:func:`summarise`),
- writes them as Markdown tables (mean ± std), a PNG with ±1 std error bars, a CSV of every
  run and a JSON file (:func:`write_csv`, :func:`write_json`, :func:`markdown_table`,
  :func:`plot_error_bars`).

Example (statistics only; a real sweep calls :func:`run_grid` first)::

    >>> rows = [{"loss": "infonce", "batch_size": 32, "seed": s, "acc": a}
    ...         for s, a in enumerate([0.5, 0.6, 0.7])]
    >>> (point,) = summarise(rows, ["acc"])
    >>> point["acc"]["mean"], round(point["acc"]["std"], 3), point["acc"]["values"]
    (0.6, 0.1, [0.5, 0.6, 0.7])
    >>> mean_std(point["acc"])
    '60.0 ± 10.0'
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from experiments import run_dir, train
from experiments.config import Config, ConfigError, check_devices, parse_config

LOSS_LABELS = {
    "infonce": "InfoNCE",
    "sigmoid": "sigmoid (SigLIP)",
    "decoupled": "decoupled (DCL)",
}
LOSSES = ("infonce", "sigmoid", "decoupled")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def int_list(text: str) -> list[int]:
    """``"32,256"`` -> ``[32, 256]`` (argparse ``type``)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of integers"
        raise argparse.ArgumentTypeError(msg) from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def name_list(text: str) -> list[str]:
    """``"infonce,sigmoid"`` -> ``["infonce", "sigmoid"]`` (argparse ``type``)."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one name")
    return values


BASE_BATCH = 256  # the batch size at which the base learning rate applies
WARMUP_FRACTION = 0.1  # of the steps, rounded down


def learning_rate(batch_size: int, base_lr: float) -> float:
    """Square-root scaling, the rule for Adam-type optimisers (Malladi et al. 2022, "On the
    SDEs and scaling rules for adaptive gradient algorithms"): ``base_lr · sqrt(B / 256)``.

    >>> learning_rate(1024, 2e-3)
    0.004
    """
    return base_lr * math.sqrt(batch_size / BASE_BATCH)


def add_grid_flags(
    p: argparse.ArgumentParser,
    *,
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    model: str,
    width: int,
    base_lr: float,
) -> None:
    """The flags both sweeps share: the grid, the image tower, the LR rule, progress, cache,
    and the output flags of :mod:`experiments.run_dir`."""
    p.add_argument("--batch-sizes", type=int_list, default=list(batch_sizes))
    p.add_argument("--losses", type=name_list, default=list(LOSSES))
    p.add_argument("--seeds", type=int_list, default=list(seeds))
    p.add_argument("--model", default=model, help="image tower (mlp, resnet, vit)")
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--depth", type=int, default=None, help="none: the tower's default")
    rule = f"peak learning rate at B={BASE_BATCH}; sqrt(B/{BASE_BATCH}) times it elsewhere"
    p.add_argument("--base-lr", type=float, default=base_lr, help=rule)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="gradient cache: batches larger than this are encoded in chunks of this many "
        "rows (exact; one extra forward pass); none: whole batches",
    )
    p.add_argument("--eval-examples", type=int, default=10000,
                   help="at most this many examples per split are evaluated")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar while each run trains")  # fmt: skip
    p.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="share compiled steps between seeds (JAX's persistent cache)")  # fmt: skip
    run_dir.add_output_flags(p)


def check_lists(args: argparse.Namespace) -> None:
    """The grid's lists name known losses and repeat nothing; :class:`ConfigError` if not."""
    for loss in args.losses:
        if loss not in LOSSES:
            raise ConfigError(f"unknown --loss {loss!r} in --losses: use {', '.join(LOSSES)}")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--seeds", args.seeds),
                         ("--losses", args.losses)):  # fmt: skip
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag} {values} repeats a value: list each once")


def grid_runs(
    args: argparse.Namespace,
    steps_for: Callable[[int], int],
    data_flags: Sequence[str],
    loss_flags: Callable[[str], list[str]] = lambda loss: [],
) -> list[GridRun]:
    """Every (seed, batch size, loss) run of ``args``' grid, seed-major (a sweep cut short
    has every point for its first seeds). A run of batch ``B`` takes ``steps_for(B)`` steps
    at peak LR :func:`learning_rate` with ⌊steps / 10⌋ warm-up steps; ``data_flags`` and
    ``loss_flags(loss)`` are further :mod:`experiments.train` flags. :class:`ConfigError`
    (one line) for a bad setting; the workdirs are set later, by :func:`execute`."""
    check_lists(args)
    runs = []
    for seed in args.seeds:
        for b in args.batch_sizes:
            steps = steps_for(b)
            for loss in args.losses:
                flags = ["--workdir", "pending", *data_flags, "--model", args.model,
                         "--width", str(args.width), "--loss", loss, "--batch-size", str(b),
                         "--steps", str(steps),
                         "--learning-rate", str(learning_rate(b, args.base_lr)),
                         "--warmup-steps", str(int(WARMUP_FRACTION * steps)), "--seed", str(seed),
                         "--checkpoint-every", str(steps), "--keep-checkpoints", "1",
                         "--log-every", str(max(1, steps // 20)),
                         "--eval-examples", str(args.eval_examples),
                         "--progress" if args.progress else "--no-progress",
                         *loss_flags(loss)]  # fmt: skip
                if args.depth is not None:
                    flags += ["--depth", str(args.depth)]
                if args.chunk_size is not None and b > args.chunk_size:
                    flags += ["--chunk-size", str(args.chunk_size)]
                runs.append(GridRun(loss, b, seed, parse_config(flags)))
    return runs


def lr_rule(args: argparse.Namespace) -> str:
    """The learning-rate rule of ``args`` in words, for the protocol."""
    return (
        f"AdamW, peak {args.base_lr:g} * sqrt(B / {BASE_BATCH}), warm-up "
        f"floor({WARMUP_FRACTION:g} * steps) steps, cosine decay to 0; weight decay 1e-4, "
        "gradient norm clipped at 1"
    )


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One point of the grid: its coordinates and the full configuration it trains."""

    loss: str
    batch_size: int
    seed: int
    config: Config

    @property
    def label(self) -> str:
        return f"{self.loss} B={self.batch_size} seed={self.seed}"


def check_runs(runs: Sequence[GridRun]) -> None:
    """Every check that needs no training, for every run: ConfigError (one line) if bad.

    The configs were checked when built; this adds the checks that need the device count.
    """
    n_dev = len(jax.devices())
    for run in runs:
        cfg = run.config
        want = cfg.run.num_devices or n_dev
        if want > n_dev:
            raise ConfigError(f"--num-devices {want} but only {n_dev} devices are present")
        check_devices(cfg, want)


@contextlib.contextmanager
def compile_cache(directory: str | os.PathLike | None) -> Iterator[None]:
    """JAX's persistent compilation cache in ``directory`` while the block runs (None: off).

    The runs of one (loss, batch size) differ only in their seed, so they compile to the
    same program: with the cache, only the first seed pays for compilation. The previous
    settings are restored afterwards. JAX decides once per process whether the cache is
    used (at the first compilation), so the cache is reset on entry and on exit.
    """
    if directory is None:
        yield
        return
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    reset_cache()
    jax.config.update(names[0], str(directory))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], -1)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        reset_cache()


def run_grid(
    runs: Sequence[GridRun],
    metrics: Sequence[str],
    describe: Callable[[GridRun], dict[str, Any]],
    after_each: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Train every run in order; one row per run: coordinates, ``describe(run)``, metrics.

    ``metrics`` are read from the run's last record (its final evaluation); ``time_s`` is
    the run's wall time. A run that diverges (:class:`experiments.train.RunError`) is kept
    as a row with ``None`` metrics and its ``error``, and the sweep goes on; a run stopped by
    SIGTERM or SIGINT (it saves a checkpoint and returns early) ends the sweep, whose rows
    so far are returned (run the same command with the same ``--out`` to resume).
    ``after_each(rows)`` is called after every run (to write partial results, so that a
    sweep stopped early still leaves its finished runs on disk).
    """
    rows: list[dict] = []
    for i, run in enumerate(runs, 1):
        info = describe(run)
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
        )
        print(f"[{i}/{len(runs)}] {run.label}: {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = {"loss": run.loss, "batch_size": run.batch_size, "seed": run.seed, **info}
        try:
            records = train.run(run.config)
        except train.RunError as e:
            row.update({m: None for m in metrics}, error=str(e))
            got = f"failed: {e}"
        else:
            final = records[-1] if records else {}
            if final.get("step", 0) < run.config.run.steps:
                print(f"[{i}/{len(runs)}] {run.label}: stopped before its last step; run the "
                      "same command with the same --out to resume", file=sys.stderr)  # fmt: skip
                break
            missing = [m for m in metrics if m not in final]
            if missing:
                raise RuntimeError(f"{run.label}: the final record has no {missing}")
            row.update({m: final[m] for m in metrics})
            row.update(final_loss=final["loss"], temperature=final["temperature"])
            got = ", ".join(f"{m} {100 * final[m]:.1f}%" for m in metrics)
        row["time_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"[{i}/{len(runs)}] {run.label}: {got} ({row['time_s']} s)", file=sys.stderr)
        if after_each is not None:
            after_each(rows)
    return rows


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
    head = ["batch", *columns, *(LOSS_LABELS.get(x, x) for x in losses)]
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
                label=LOSS_LABELS.get(loss, loss),
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


def describe_run(run: GridRun) -> dict[str, Any]:
    """What the JSON records of a run's schedule: examples seen, steps, peak LR, warm-up."""
    cfg = run.config
    return {
        "examples": cfg.run.steps * cfg.run.batch_size,
        "steps": cfg.run.steps,
        "learning_rate": cfg.train.optim.learning_rate,
        "warmup_steps": cfg.train.optim.warmup_steps,
        "chunk_size": cfg.train.chunk_size,
    }


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """How one sweep script names, tabulates and plots its grid (see :func:`execute`)."""

    stem: str  # output files: <stem>.{json,md,csv,png}
    title: str  # the Markdown heading and the plot's title
    metrics: tuple[str, ...]  # read from each run's final record, in [0, 1]
    tables: tuple[tuple[str, str], ...]  # (metric, caption): one Markdown table each
    panels: tuple[tuple[str, str], ...]  # (metric, axis label): one plot panel each
    protocol: dict[str, Any]  # the fixed settings, into the JSON and the Markdown
    columns: dict[str, Callable[[int], str]] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()  # lines under the protocol in the Markdown


def outputs(spec: SweepSpec) -> list[str]:
    """The file names a sweep writes into its run directory."""
    return [f"{spec.stem}.{ext}" for ext in ("json", "md", "csv", "png")]


def report(spec: SweepSpec, points: Sequence[dict], untrained: dict, losses: Sequence[str],
           finished: int, total: int) -> str:  # fmt: skip
    """The Markdown report: protocol, one table per ``spec.tables``, the untrained model."""
    lines = [f"## {spec.title}", ""]
    lines += [f"- {k}: {v}" for k, v in spec.protocol.items()]
    lines += [f"- {n}" for n in spec.notes]
    if finished < total:
        lines.append(f"- **partial: {finished} of {total} runs finished**")
    for metric, caption in spec.tables:
        lines += ["", f"{caption}, % (mean ± sample std over seeds):", ""]
        lines.append(markdown_table(points, metric, losses, spec.columns))
        if metric in untrained:
            lines.append(f"\nUntrained model (same seeds): {mean_std(untrained[metric])}.")
    return "\n".join(lines) + "\n"


def execute(
    spec: SweepSpec,
    runs: Sequence[GridRun],
    losses: Sequence[str],
    args: argparse.Namespace,
    prog: str,
    argv: Sequence[str] | None,
) -> int:
    """Check, then run a grid and write its outputs; the ``main`` of both sweep scripts.

    ``runs`` come without workdirs; each gets ``<run dir>/runs/<loss>_b<B>_s<seed>``.
    ``args`` needs ``out``, ``update_results`` (:func:`experiments.run_dir.add_output_flags`)
    and ``compile_cache``. Returns the exit status: 2 with one line on stderr for a bad
    configuration (before anything runs), else 0 after printing the table and the run
    directory.
    """
    t_start = time.perf_counter()
    try:
        check_runs(runs)
        out = run_dir.create(spec.stem, args.out)
        runs = [
            dataclasses.replace(
                r,
                config=r.config.with_updates(
                    workdir=str(out / "runs" / f"{r.loss}_b{r.batch_size}_s{r.seed}")
                ),
            )
            for r in runs
        ]
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    untrained: dict[str, Any] = {}
    record: dict[str, Any] = {
        "command": command_line(prog, argv),
        "protocol": spec.protocol,
        "spread": "sample standard deviation over seeds (n - 1); min and max also given",
        "machine": {
            "cpu_count": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "load_average_at_start": load_start,
        },
    }

    def write(rows: list[dict]) -> str:
        points = summarise(rows, spec.metrics)
        for p in points:  # the schedule of the point (the same for every seed)
            first = next(
                r for r in rows if (r["loss"], r["batch_size"]) == (p["loss"], p["batch_size"])
            )
            p.update({k: first[k] for k in ("examples", "steps", "learning_rate", "warmup_steps")})
        text = report(spec, points, untrained, losses, len(rows), len(runs))
        record.update(
            untrained=untrained,
            points=points,
            runs=rows,
            complete=len(rows) == len(runs),
            runs_planned=len(runs),
            total_time_s=round(time.perf_counter() - t_start, 1),
        )
        record["machine"]["load_average_at_end"] = os.getloadavg()
        write_json(out / f"{spec.stem}.json", record)
        write_csv(out / f"{spec.stem}.csv", rows)
        (out / f"{spec.stem}.md").write_text(text)
        plot_error_bars(points, spec.panels, losses, out / f"{spec.stem}.png", spec.title,
                        {m: s["mean"] for m, s in untrained.items()})  # fmt: skip
        return text

    try:
        with compile_cache(out / "compile_cache" if args.compile_cache else None):
            # The untrained model of each seed: what training adds is measured against it.
            first_of_seed = {}
            for r in runs:
                first_of_seed.setdefault(r.seed, r)
            base = [train.evaluate_init(r.config) for r in first_of_seed.values()]
            untrained.update({m: statistics([b[m] for b in base]) for m in spec.metrics})
            rows = run_grid(runs, spec.metrics, describe_run, after_each=write)
    except ConfigError as e:  # e.g. --out holds runs made with other settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = write(rows)
    if args.update_results:
        run_dir.publish(out, outputs(spec))
    print(text)
    print(f"run directory: {out}")
    return 0


def main_of(
    parser: argparse.ArgumentParser,
    build: Callable[[argparse.Namespace], tuple[SweepSpec, list[GridRun]]],
    argv: Sequence[str] | None,
) -> int:
    """A sweep script's ``main``: parse, build the spec and runs, :func:`execute`."""
    args = parser.parse_args(argv)
    try:
        check_lists(args)  # before ``build``, which may read data
        spec, runs = build(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return execute(spec, runs, args.losses, args, parser.prog, argv)
