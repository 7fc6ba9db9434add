"""A grid of (loss, batch size, seed) runs: built as configs, checked, trained, reported.

Every sweep builds its runs as :class:`~contrastive.configs.Config` updates of one base
config (:func:`grid_runs`), checks all of them before the first starts (:func:`check_runs`:
a bad one is one :class:`~contrastive.configs.ConfigError` line), trains them one after
another through :func:`contrastive.run.loop.train` (:func:`run_grid`), each in its own work dir
inside the run directory, and writes its report after every run (:func:`execute`). A work dir
that holds a finished run is read back, not trained again, so a sweep cut short resumes where
it stopped. The report's protocol is printed from the runs' own configs
(:func:`protocol_of`): the settings every run shares, and the ones the grid varies, so the
prose cannot drift from what runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from contrastive.configs import Config, ConfigError
from contrastive.loss_registry import LOSS_NAMES
from contrastive.models import IMAGE_ENCODERS
from contrastive.run.assemble import evaluate_untrained
from contrastive.run.loop import RunError, train
from experiments.common import run_dir
from experiments.common.cli import (
    int_list,
    name_list,
    positive_float,
    positive_int,
    shared_module,
)
from experiments.common.reports import (
    command_line,
    markdown_table,
    mean_std,
    plot_error_bars,
    stack_record,
    statistics,
    summarise,
    write_csv,
    write_json,
)

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
    and the output flags of :mod:`experiments.common.run_dir`."""
    p.add_argument("--batch-sizes", type=int_list, default=list(batch_sizes),
                   help="global batch sizes of the grid, comma-separated")  # fmt: skip
    p.add_argument("--losses", type=name_list, default=list(LOSS_NAMES),
                   help="losses of the grid, comma-separated")  # fmt: skip
    p.add_argument("--seeds", type=int_list, default=list(seeds),
                   help="seeds (initialisation and data order), comma-separated")  # fmt: skip
    p.add_argument("--model", default=model, choices=IMAGE_ENCODERS, help="image tower")
    p.add_argument("--width", type=positive_int, default=width, help="image tower width")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="image tower depth; none: the tower's default")  # fmt: skip
    rule = f"peak learning rate at B={BASE_BATCH}; sqrt(B/{BASE_BATCH}) times it elsewhere"
    p.add_argument("--base-lr", type=positive_float, default=base_lr, help=rule)
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="gradient cache: batches larger than this are encoded in chunks of this many "
        "rows (exact; one extra forward pass); none: whole batches",
    )
    p.add_argument("--eval-examples", type=positive_int, default=10000,
                   help="at most this many examples per split are evaluated")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar while each run trains")  # fmt: skip
    p.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="share compiled steps between seeds (JAX's persistent cache)")  # fmt: skip
    run_dir.add_output_flags(p)


def check_lists(args: argparse.Namespace) -> None:
    """The grid's lists name known losses and repeat nothing; :class:`ConfigError` if not."""
    for loss in args.losses:
        if loss not in LOSS_NAMES:
            raise ConfigError(f"unknown --loss {loss!r} in --losses: use {', '.join(LOSS_NAMES)}")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--seeds", args.seeds),
                         ("--losses", args.losses)):  # fmt: skip
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag} {values} repeats a value: list each once")


def grid_runs(
    args: argparse.Namespace,
    base: Config,
    steps_for: Callable[[int], int],
    loss_updates: Callable[[str], dict[str, Any]] = lambda loss: {},
) -> list[GridRun]:
    """Every (seed, batch size, loss) run of ``args``' grid as an update of ``base``,
    seed-major (a sweep cut short has every point for its first seeds). A run of batch ``B``
    takes ``steps_for(B)`` steps at peak LR :func:`learning_rate` with ⌊steps / 10⌋ warm-up
    steps; ``loss_updates(loss)`` are further settings per loss. :class:`ConfigError` (one
    line) for a bad setting; the work dirs are set later, by :func:`execute`."""
    check_lists(args)
    runs = []
    for seed in args.seeds:
        for b in args.batch_sizes:
            steps = steps_for(b)
            for loss in args.losses:
                updates: dict[str, Any] = dict(
                    model=args.model,
                    width=args.width,
                    loss=loss,
                    batch_size=b,
                    steps=steps,
                    learning_rate=learning_rate(b, args.base_lr),
                    warmup_steps=int(WARMUP_FRACTION * steps),
                    seed=seed,
                    checkpoint_every=steps,
                    keep_checkpoints=1,
                    log_every=max(1, steps // 20),
                    eval_examples=args.eval_examples,
                    progress=args.progress,
                    **loss_updates(loss),
                )
                if args.depth is not None:
                    updates["depth"] = args.depth
                if args.chunk_size is not None and b > args.chunk_size:
                    updates["chunk_size"] = args.chunk_size
                runs.append(GridRun(loss, b, seed, base.with_updates(**updates)))
    return runs


def lr_rule(args: argparse.Namespace) -> str:
    """The learning-rate rule of ``args`` in words, for the protocol."""
    return (
        f"peak {args.base_lr:g} * sqrt(B / {BASE_BATCH}), warm-up floor({WARMUP_FRACTION:g} * "
        "steps) steps, cosine decay to the end"
    )


def protocol_of(runs: Sequence[GridRun]) -> dict[str, Any]:
    """What the runs' configs say, read back from them: ``{"fixed": {flag: value}, "varied":
    [flags]}`` over every setting that changes the computation (``--seed`` and the grid's
    axes vary; everything else is the same for every run, or listed as varied)."""
    identities = [r.config.identity() for r in runs]
    flags = list(identities[0]) if identities else []
    fixed, varied = {}, []
    for flag in flags:
        values = {repr(i.get(flag)) for i in identities}
        if len(values) == 1:
            fixed[flag] = identities[0][flag]
        else:
            varied.append(flag)
    return {"fixed": fixed, "varied": varied}


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
        cfg.check_devices(want)


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
            records = train(run.config)
        except RunError as e:
            row.update({m: None for m in metrics}, error=str(e))
            got = f"failed: {e}"
        else:
            final = records[-1] if records else {}
            if final.get("step", 0) < run.config.steps:
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


def describe_run(run: GridRun) -> dict[str, Any]:
    """What the JSON records of a run's schedule: examples seen, steps, peak LR, warm-up."""
    cfg = run.config
    return {
        "examples": cfg.steps * cfg.run.batch_size,
        "steps": cfg.steps,
        "learning_rate": cfg.train.optim.learning_rate,
        "warmup_steps": cfg.train.optim.warmup,
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
    columns: dict[str, Callable[[int], str]] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()  # the grid's rules in words (no setting restated)


def outputs(spec: SweepSpec) -> list[str]:
    """The file names a sweep writes into its run directory."""
    return [f"{spec.stem}.{ext}" for ext in ("json", "md", "csv", "png")]


def report(spec: SweepSpec, protocol: dict[str, Any], points: Sequence[dict], untrained: dict,
           losses: Sequence[str], finished: int, total: int) -> str:  # fmt: skip
    """The Markdown report: protocol (read from the runs' configs, :func:`protocol_of`), one
    table per ``spec.tables``, the untrained model."""
    lines = [f"## {spec.title}", ""]
    lines += [f"- {n}" for n in spec.notes]
    lines.append("- varied by the grid: " + ", ".join(f"`{f}`" for f in protocol["varied"]))
    fixed = ", ".join(f"`{f} {v}`" for f, v in protocol["fixed"].items())
    lines.append(f"- the same in every run: {fixed}")
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
    print(f"run directory: {out}", file=sys.stderr, flush=True)
    load_start = os.getloadavg()
    untrained: dict[str, Any] = {}
    record: dict[str, Any] = {
        "command": command_line(prog, argv),
        "protocol": {"rules": list(spec.notes), **protocol_of(runs)},
        "spread": "sample standard deviation over seeds (n - 1); min and max also given",
        "machine": {
            "cpu_count": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()],
            "load_average_at_start": load_start,
        },
        "stack": stack_record(),
    }

    def write(rows: list[dict]) -> str:
        points = summarise(rows, spec.metrics)
        for p in points:  # the schedule of the point (the same for every seed)
            first = next(
                r for r in rows if (r["loss"], r["batch_size"]) == (p["loss"], p["batch_size"])
            )
            p.update({k: first[k] for k in ("examples", "steps", "learning_rate", "warmup_steps")})
        text = report(spec, record["protocol"], points, untrained, losses, len(rows), len(runs))
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
            base = [evaluate_untrained(r.config) for r in first_of_seed.values()]
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
    """A sweep command's ``main``: parse, build the spec and runs, :func:`execute`."""
    args = parser.parse_args(argv)
    try:
        check_lists(args)  # before ``build``, which may read data
        spec, runs = build(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return execute(spec, runs, args.losses, args, parser.prog, argv)


if __name__ == "__main__":
    sys.exit(shared_module(__name__))
