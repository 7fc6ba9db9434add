"""The training loop: ``train(config)`` trains (or resumes) one run and returns its records.

Reads top to bottom: checks -> parts (:func:`contrastive.run.assemble.setup`: mesh, data, model,
shard, step) -> checkpoint -> loop. Writes ``workdir/metrics.jsonl`` (one JSON object per
logged step: ``step``, ``loss``, ..., and the evaluation results at evaluation steps) and
``workdir/checkpoints/`` (orbax).

Started again with the same work dir it resumes from the latest checkpoint, and a run killed
at any moment then ends with exactly the per-step losses of an uninterrupted run: the batches
are a pure function of (seed, step) and, with ``--hard-batches``, of the clustering the
checkpoint holds, and the checkpoint holds the parameters, optimiser state, PRNG key, step
and data position.

Every record says the step's global ``batch_size`` and the ``examples`` trained on so far.
With ``--adaptive-batch`` the batch grows after a noise-scale measurement says so, at an
aligned step, in the same data order (:mod:`contrastive.run.adaptive_batch`: the rule, and
the phases the checkpoints hold, so that a resume is exact across a change of batch size);
the loop then trains with the run's inputs and step for the new size (:meth:`Setup.resize`).

>>> from contrastive.configs import Config
>>> records = train(Config().with_updates(workdir="/tmp/run", steps=2))  # doctest: +SKIP
>>> records[-1]["linear_probe"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from contrastive.configs import Config, ConfigError, differences, parse_stop_at
from contrastive.data.pipeline import lower_is_better, target_reached
from contrastive.run.adaptive_batch import BatchPhases
from contrastive.run.assemble import Setup, setup
from contrastive.run.checkpoint import Checkpointer, CheckpointWriteError, NoUsableCheckpointError
from contrastive.run.hosts import Watchdog, start
from contrastive.run.metric_writers import TensorBoardWriter
from contrastive.run.noise_meter import NoiseMeter
from contrastive.run.orbax_logs import one_line
from contrastive.run.run_guard import MetricsLog, StopSignals, WorkdirLock, WorkdirLockedError
from contrastive.settings import unwritable_reason
from contrastive.step.streamed.sources import ChunkReadError

__all__ = ["METRICS_FILE", "RunError", "train", "check_paths", "check_same_run", "summary_line"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # `tensorboard --logdir WORKDIR/tensorboard`
MIN_EVAL_GROWTH = 1.0001  # --eval-growth: nearer to 1 evaluates every step up to 10,000


class RunError(RuntimeError):
    """The run cannot go on (divergence, no usable checkpoint, a busy work dir, a checkpoint
    that could not be written); one line."""


def _check_writable_dir(flag: str, path: str) -> None:
    """``path`` is (or is now) a directory this process can write; ConfigError if not.

    Tried, not inferred from permission bits: ``os.access`` says yes to root on a read-only
    file system, and a path below a regular file fails only when something is created.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file: pass a directory")
    why = unwritable_reason(path)
    if why is not None:
        raise ConfigError(f"{flag} {path} cannot be used ({why}): pass a writable directory")


def check_paths(cfg: Config) -> None:
    """Refuse a work dir that cannot be written and a data dir that would be created out of
    nowhere, before anything starts."""
    workdir, data_dir = cfg.run.workdir, cfg.data.data_dir
    if not workdir:
        raise ConfigError("--workdir is required: pass a directory for checkpoints and metrics")
    # Checked before the work dir is created: a bad one leaves nothing behind.
    if data_dir is not None:
        parent = os.path.dirname(os.path.abspath(data_dir))
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise ConfigError(f"--data-dir {data_dir} is a file: pass a directory")
        if not os.path.isdir(parent):
            raise ConfigError(
                f"--data-dir {data_dir}: its parent directory {parent} does not exist; create it "
                "or pass an existing directory"
            )
    cache = cfg.run.feature_cache
    if cache is not None:
        existing = os.path.abspath(cache)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"--feature-cache {cache}: {existing} is a file: pass a directory")
    _check_writable_dir("--workdir", workdir)
    board = os.path.join(workdir, TENSORBOARD_DIR)
    if cfg.run.tensorboard and os.path.lexists(board):  # checked here, not after training
        try:
            _check_writable_dir("--workdir", board)
        except ConfigError as e:
            raise ConfigError(f"{e}, or remove it, or pass --no-tensorboard") from None


def check_same_run(meta: dict, cfg: Config, inputs: dict | None = None) -> None:
    """Before a checkpoint is restored: it was written by a run with these settings, else a
    :class:`ConfigError` naming every flag that differs, with its old and new value.

    ``inputs`` (:attr:`Setup.inputs`: the device count and the digests of inputs the run did
    not compute, e.g. locked features) must equal what the checkpoint recorded: other
    features, or another device count, are one line saying what the checkpoints were written
    with and how to go on, never "unusable checkpoints". Checkpoints written before inputs
    were recorded are not checked on them.
    """
    changed = differences(meta.get("config") or {}, cfg.identity())
    if changed:
        raise ConfigError(
            f"{cfg.run.workdir} holds a run with other settings ({'; '.join(changed)}): use a "
            "new --workdir, or the same settings to resume it"
        )
    old = meta.get("inputs")
    if not old or inputs is None:
        return
    if old.get("devices") not in (None, inputs.get("devices")):
        raise ConfigError(
            f"the checkpoints in {cfg.run.workdir} were written on {old['devices']} devices and "
            f"this run has {inputs.get('devices')} (they are intact): resume on "
            f"{old['devices']} devices (--num-devices {old['devices']} where more are present), "
            "or use a new --workdir"
        )
    changed = [
        f"the {name} (sha256 {str(old[name])[:12]} then, {str(inputs.get(name))[:12]} now)"
        for name in old
        if name != "devices" and old[name] != inputs.get(name)
    ]
    if changed:
        raise ConfigError(
            f"{' and '.join(changed)} changed since the checkpoints in {cfg.run.workdir} were "
            "written (the checkpoints are intact): restore the inputs they were trained on to "
            "resume, or use a new --workdir"
        )


def _finite(value: float) -> bool:
    return bool(np.isfinite(value))


def train(
    cfg: Config, *, watchdog: Watchdog | None = None, on_second_signal: str = "raise"
) -> list[dict]:
    """Train (or resume) the run in ``cfg.run.workdir``; returns every metrics record.

    Nothing a run has finished is lost: only finite states are checkpointed (a non-finite
    loss, gradient norm or state stops the run at that step with :class:`RunError`), a
    corrupted newest checkpoint is reported and skipped, changed settings are refused
    before anything is restored, one run holds the work dir at a time, and SIGTERM or
    SIGINT end the run after the current step with a checkpoint (exit status 0).
    """
    r = cfg.run
    created = bool(r.workdir) and not os.path.lexists(r.workdir)
    try:
        check_paths(cfg)
        if cfg.hosts.enabled and watchdog is None:
            return _train_on_hosts(cfg, on_second_signal)
        s = setup(cfg)
    except BaseException:
        # Bad input found while setting up (a data set not prepared, unreadable features) or
        # Ctrl-C during it: a work dir this call created and nothing filled is removed.
        if created:
            _remove_empty_dirs(r.workdir)
        raise
    lead = jax.process_index() == 0
    beat = watchdog.beat if watchdog is not None else (lambda: None)
    os.makedirs(r.workdir, exist_ok=True)
    try:
        lock = WorkdirLock(r.workdir).acquire()
    except WorkdirLockedError as e:
        raise RunError(str(e)) from None
    try:
        with StopSignals(on_second=on_second_signal) as stop:
            return _train(cfg, s, stop, beat, lead)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective whose peer died fails here (or hangs until the watchdog ends it).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(
            f"process {jax.process_index()} of {jax.process_count()}: a step across the hosts "
            f"failed ({first}); a peer process is probably dead: restart every process with "
            "the same command to resume from the last checkpoint"
        ) from None
    finally:
        lock.release()


def _remove_empty_dirs(top: str) -> None:
    """Remove ``top`` and the directories below it, bottom-up, as far as they are empty
    (``os.rmdir`` refuses a directory that holds anything: no file is ever removed)."""
    for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)


def _train(cfg: Config, s: Setup, stop: StopSignals, beat, lead: bool) -> list[dict]:
    r = cfg.run
    # --- checkpoint ------------------------------------------------------------------------
    ckpt = Checkpointer(r.workdir, every=r.checkpoint_every, keep=r.keep_checkpoints)
    try:
        restored, meta, restored_step = ckpt.restore_latest(
            {"train": s.state, "key": s.key}, check_meta=lambda m: check_same_run(m, cfg, s.inputs)
        )
    except NoUsableCheckpointError as e:
        ckpt.close()
        raise RunError(str(e)) from None
    except ConfigError:
        ckpt.close()
        raise
    beat()
    state, key = restored["train"], restored["key"]
    start = int(meta.get("step", 0)) if restored_step is not None else 0
    if restored_step is not None:
        stop.checkpointed(os.path.join(ckpt.directory, str(restored_step)))
    # A run that stopped at its --stop-at target is finished: nothing to resume.
    end = start if meta.get("reached_target") else cfg.steps
    target = parse_stop_at(r.stop_at)
    evaluate_at = geometric_steps(r.eval_growth, cfg.steps)
    phases = BatchPhases(cfg, meta)  # the batch sizes so far (--adaptive-batch)
    part = _part_for(s, phases.at(start + 1).batch_size, phases.at(start + 1).learning_rate)
    noise = NoiseMeter(cfg, part) if r.noise_scale_every else None
    inputs = part.make_inputs()
    if meta:
        inputs.set_state(meta["data"])
    log = MetricsLog.open(os.path.join(r.workdir, METRICS_FILE), upto_step=start, write=lead)
    logged = max((rec["step"] for rec in log.records()), default=0)
    if restored_step is not None and start >= end and logged >= start and lead:
        # (A log that lost records says so below, and that the final record is recomputed.)
        why = "reached its --stop-at target" if meta.get("reached_target") else "ran every step"
        tqdm.write(
            f"{r.workdir} holds a finished run (it {why}; checkpoint {start}): nothing was "
            "trained; its final record follows (use a new --workdir for a new run)",
            file=sys.stderr,
        )
    if logged < start:  # a kill tore the log after the checkpoint was written
        lost = f"step {start}" if logged + 1 == start else f"steps {logged + 1}-{start}"
        if lead:
            tqdm.write(
                f"{METRICS_FILE} had lost the records of {lost} (torn by a kill); the "
                f"checkpoint of step {start} is intact"
                + ("; its final evaluation is computed again" if end == start else ""),
                file=sys.stderr,
            )
        if end == start:  # a finished run: its final record, evaluated again from the state
            log.append({"step": start, "recovered_from_checkpoint": True,
                        **s.evaluate(state.params)})  # fmt: skip
    tb = None
    if r.tensorboard:
        tb = TensorBoardWriter(
            os.path.join(r.workdir, TENSORBOARD_DIR), resume_from_step=start, run_name="train"
        )
        tb.write_text("config", "```\n" + json.dumps(cfg.identity(), indent=1) + "\n```")

    # --- loop ------------------------------------------------------------------------------
    def save(step: int, force: bool = False, reached: bool = False) -> None:
        if not force and not ckpt.should_save(step):
            return  # the inputs' state (a clustering with hard batches) costs to encode
        meta = {"step": step, "data": inputs.get_state(), "config": cfg.identity()}
        meta["inputs"] = s.inputs
        meta.update(phases.meta())
        if reached:
            meta["reached_target"] = True
        tree = {"train": state, "key": key}
        with stop.saving():  # a second signal in here abandons this write
            try:
                if force:
                    wrote = ckpt.save(step, tree, meta, force=True)
                else:
                    wrote = ckpt.maybe_save(step, tree, meta)
            except CheckpointWriteError as e:  # e.g. a full disk; older checkpoints are intact
                raise RunError(str(e)) from None
        if wrote:
            stop.checkpointed(os.path.join(ckpt.directory, str(step)))

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (r.progress and lead), desc="train")
    try:
        for step in range(start + 1, end + 1):  # `step` counts completed steps
            phase = phases.at(step)
            if phase.batch_size != part.batch_size:  # a grown batch from this step on
                inputs.close()
                part = _part_for(s, phase.batch_size, phase.learning_rate)
                inputs = part.make_inputs()
                if noise is not None:
                    noise.close()
                    noise = NoiseMeter(cfg, part)
            try:
                batch, input_metrics = inputs.for_step(phases.data_step(step), state.params)
            except jax.errors.JaxRuntimeError:
                raise  # a collective or a refresh on the devices: train() says what happened
            except Exception as e:  # a data file that cannot be read: one line, nothing lost
                last = ckpt.latest_step()
                raise RunError(
                    f"step {step}: reading the training data failed ({one_line(e)}); "
                    f"{'checkpoint ' + str(last) if last else 'no checkpoint'} is intact: "
                    "repair or rebuild the data set, then run the same command"
                ) from None
            measure = noise is not None and step % r.noise_scale_every == 0
            try:
                state, m = part.step_fn(state, batch, key)
            except ChunkReadError as e:  # --stream: a chunk unreadable or changed; no update
                last = ckpt.latest_step()
                raise RunError(
                    f"{' '.join(str(e).split())}; "
                    f"{'checkpoint ' + str(last) if last else 'no checkpoint'} is intact: "
                    "repair or rebuild the data set, then run the same command"
                ) from None
            values = {k: float(v) for k, v in m.items()}  # waits for the step
            values.update(input_metrics)
            beat()
            bad = [k for k in ("loss", "grad_norm") if not _finite(values[k])]
            if bad or values["finite"] != 1.0:
                what = ", ".join(f"{k} = {values[k]}" for k in bad) or "the new state"
                last = ckpt.latest_step()
                verb = "are" if len(bad) > 1 else "is"
                raise RunError(
                    f"step {step}: {what} {verb} not finite: the run diverged and stopped before "
                    f"saving that step; {'checkpoint ' + str(last) if last else 'no checkpoint'} "
                    "on disk holds a finite state (a lower --learning-rate, in a new --workdir, "
                    "may help)"
                )
            last = step == cfg.steps
            do_eval = last or (r.eval_every and step % r.eval_every == 0) or step in evaluate_at
            reached = False
            if do_eval or measure or step % r.log_every == 0 or step == 1 or phases.starts(step):
                rec = {"step": step, **values, **phases.record(step)}
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                if measure:  # the state after this step; with --adaptive-batch, maybe a growth
                    rec.update(noise.measure(step, state, key, phases.data_step(step)))
                    rec.update(phases.after_measurement(step, rec["noise_b_simple"]))
                    if "next_batch_size" in rec and lead:
                        tqdm.write(_growth_line(rec, cfg))
                if do_eval:
                    # Between the full evaluations, a run stopping at a target checks the
                    # target's metric alone (the geometric schedule's many small checks).
                    full = last or (r.eval_every and step % r.eval_every == 0)
                    quick = None if full or target is None else target[0]
                    rec.update(s.evaluate(state.params, only=quick))
                    beat()
                    reached = target is not None and target_reached(*target_value(rec, target))
                    if reached:
                        if quick:  # the run ends here: its full evaluation
                            rec.update(s.evaluate(state.params))
                        sign = "<=" if lower_is_better(target[0]) else ">="
                        rec["reached_target"] = f"{target[0]}{sign}{target[1]:g}"
                log.append(rec)
                if tb is not None:
                    numbers = {k: v for k, v in rec.items() if isinstance(v, int | float)}
                    tb.write_scalars(step, {k: v for k, v in numbers.items() if k != "step"})
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            stopping = stop.agreed()
            save(step, force=last or stopping or reached, reached=reached)
            beat()
            if stopping:
                if lead:
                    tqdm.write(
                        f"stopped by {stop.name or 'a signal to another process'} after step "
                        f"{step}: checkpoint saved in {r.workdir}; run the same command to resume"
                    )
                break
            if reached:
                break  # the target is reached: the run is finished
            if r.stop_after is not None and step >= r.stop_after:
                break  # as if killed here: no checkpoint beyond the periodic ones
    finally:
        bar.close()
        inputs.close()
        if noise is not None:
            noise.close()
        ckpt.close()
        log.close()
        if tb is not None:
            tb.close()
    return log.records()


def _part_for(s: Setup, batch_size: int, learning_rate: float) -> Setup:
    """The run's inputs and step for a phase: ``s`` itself at its own batch size."""
    return s if batch_size == s.batch_size else s.resize(batch_size, learning_rate)


def _growth_line(rec: dict, cfg: Config) -> str:
    r = cfg.run
    return (
        f"step {rec['step']}: B_simple {rec['noise_b_simple']:.4g} >= {r.adaptive_factor:g} x "
        f"the batch {rec['batch_size']}: the batch grows to {rec['next_batch_size']} from step "
        f"{rec['next_batch_from_step']} (peak learning rate {rec['next_learning_rate']:.4g}, "
        f"--adaptive-lr {r.adaptive_lr})"
    )


def geometric_steps(growth: float, total: int) -> frozenset[int]:
    """The steps ``ceil(growth^k)``, k = 0, 1, ..., up to ``total`` (empty for growth 0).

    A fixed set, so that a resumed run evaluates where an uninterrupted one does.

    >>> sorted(geometric_steps(1.5, 10))
    [1, 2, 3, 4, 6, 8]
    """
    if not growth:
        return frozenset()
    if growth < MIN_EVAL_GROWTH:  # 1 + 2e-16 would take ~1e17 multiplications: never ends
        raise ValueError(f"growth must be 0 or at least {MIN_EVAL_GROWTH}, got {growth!r}")
    steps, g = set(), 1.0
    while g <= total:
        steps.add(math.ceil(g - 1e-9))
        g *= growth
    return frozenset(steps)


def _train_on_hosts(cfg: Config, on_second_signal: str) -> list[dict]:
    """:func:`train` on several processes: start the runtime, watch the peers, train."""
    h = cfg.hosts
    start(h.coordinator_address, h.num_processes, h.process_id, timeout_s=h.peer_timeout)
    watchdog = Watchdog(h.peer_timeout, "the multi-host run").__enter__()
    try:
        return train(cfg, watchdog=watchdog, on_second_signal=on_second_signal)
    finally:
        watchdog.stop()


def target_value(rec: dict, target: tuple[str, float]) -> tuple[str, float, float]:
    """``(metric, value, target)`` of a ``--stop-at`` target in an evaluation record."""
    return target[0], rec[target[0]], target[1]


def summary_line(records: list[dict], workdir: str) -> str:
    """The last line a run prints: where it is, how far it got, its final metrics."""
    if not records:
        return f"nothing to do: {workdir} holds a finished run"
    final = records[-1]
    keep = ("loss", "temperature", "linear_probe", "knn", "zero_shot_top1", "val_zero_shot_top1",
            "val_zero_shot_xent", "i2t_r@1", "t2i_r@1", "noise_b_simple")  # fmt: skip
    parts = [f"{k} {final[k]:.4g}" for k in keep if k in final]
    return f"step {final['step']}: " + ", ".join(parts) + f" (metrics: {workdir}/{METRICS_FILE})"
