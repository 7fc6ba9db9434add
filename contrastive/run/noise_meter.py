"""The gradient noise scale of a run: every K steps while it trains (:class:`NoiseMeter`,
``--noise-scale-every``) and at one of its checkpoints (:func:`measure_checkpoint`); its own
batches, no update.

:func:`measure_checkpoint` restores a checkpoint of a run, draws the batches the run would
train on next and measures the fixed-batch noise scale
(:func:`contrastive.measure.noise_scale.fixed_batch_noise_scale`) with the run's own gradient.
It builds the run (:func:`contrastive.run.assemble.setup`) and reads its checkpoints, so it
lives with the run, above the estimators it calls.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from contrastive.configs import Config, ConfigError, differences
from contrastive.measure.noise_scale import NoiseEstimate, fixed_batch_noise_scale, make_gradient_fn
from contrastive.run import adaptive_batch as ab
from contrastive.run.assemble import Setup, setup
from contrastive.run.checkpoint import Checkpointer

__all__ = ["NoiseMeter", "measure_checkpoint"]

# An adaptive run's settings turned off: a probe of one of its checkpoints at one batch size.
FIXED_BATCH = dict(
    adaptive_batch=False, max_batch_size=None, adaptive_factor=1.0, adaptive_lr="sqrt"
)


def measure_checkpoint(
    cfg: Any,
    *,
    num_batches: int = 32,
    step: int | None = None,
    batch_size: int | None = None,
) -> NoiseEstimate:
    """The fixed-batch noise scale of the run ``cfg`` at one of its checkpoints.

    Restores checkpoint ``step`` of ``cfg.run.workdir`` (default: the newest; the run's
    settings must match ``cfg``, as for a resume), draws the ``num_batches`` batches the run
    would train on at the steps after it (``step + 1 .. step + m``: examples the checkpoint
    has not trained on in this epoch, from the run's own input pipeline and seed), and
    measures :func:`fixed_batch_noise_scale` with the run's gradient (cache, ring, loss,
    negative queue). Nothing is written. ``batch_size``: measure at another ``B`` (the same
    data, cut into batches of that size; e.g. ``B/4`` and ``4B`` to check that ``B V`` does
    not move with ``B``). Cost: ``num_batches`` gradients of a batch.

    A run whose batch grew (``--adaptive-batch``) is measured at the batch of the
    checkpoint's phase, on the examples after the checkpoint (what its meter measured after
    that step); ``batch_size`` cuts those examples at another size.

    Example (from the study, per run and checkpoint; then
    :func:`~contrastive.measure.noise_scale.combine` over seeds)::

        est = measure_checkpoint(run_config, step=200, num_batches=32)
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an integer >= 2, got {num_batches!r}")
    if not os.path.isdir(os.path.join(cfg.run.workdir, "checkpoints")):
        raise ConfigError(f"{cfg.run.workdir} holds no checkpoint to measure")
    if batch_size is not None and batch_size != cfg.run.batch_size and cfg.train.negative_queue:
        raise ConfigError(
            "batch_size: a run with a negative queue is measured at its own batch size only"
        )
    if cfg.train.stream or cfg.data.hard_batches:
        raise ConfigError(
            "measure_checkpoint draws whole random batches: not for --stream or --hard-batches"
        )
    ckpt = Checkpointer(cfg.run.workdir, every=1)
    try:  # the checkpoint and its settings are checked before the run is built
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"{cfg.run.workdir} holds no checkpoint to measure")
        at = steps[-1] if step is None else step
        if at not in steps:
            raise ConfigError(f"{cfg.run.workdir} has no checkpoint {at} (it has {steps})")
        written = ckpt.read_meta(at)
        changed = differences(written.get("config") or {}, cfg.identity())
        if changed:
            raise ConfigError(
                f"{cfg.run.workdir} holds a run with other settings ({'; '.join(changed)})"
            )
        phases = ab.BatchPhases(cfg, written)  # one phase unless the batch grew
        b = phases.at(at).batch_size if batch_size is None else batch_size
        probe_cfg = cfg
        if phases.adaptive:  # a run at one batch size, the checkpoint's or the one asked for
            probe_cfg = cfg.with_updates(batch_size=b, **FIXED_BATCH)
        elif b != cfg.run.batch_size:
            probe_cfg = cfg.with_updates(batch_size=b)
        s = setup(probe_cfg)
        restored, meta = ckpt.restore(at, {"train": s.state, "key": s.key})
    finally:
        ckpt.close()
    state, key = restored["train"], restored["key"]
    grad = make_gradient_fn(s.graphdef, probe_cfg.train, s.mesh)
    inputs = s.make_inputs()
    try:
        done = int(meta.get("step", at))
        # The input step after the checkpoint: the next examples, cut at b (adaptive), or
        # the run's next step at b (the batch never changes: as the study measured).
        first = ab.examples_after(phases.phases, done) // b if phases.adaptive else done

        def batches():
            for j in range(1, 1 + num_batches):
                yield done + j, inputs.for_step(first + j, state.params)[0]

        def grad_fn(item):
            t, batch = item
            # The key the step would use for this batch (dropout), as train_step folds it.
            return grad(state.params, batch, jax.random.fold_in(key, t - 1), state.queue)

        return fixed_batch_noise_scale(grad_fn, batches(), batch_size=b, num_batches=num_batches)
    finally:
        inputs.close()


class NoiseMeter:
    """The gradient noise scale of a run (McCandlish et al. 2018, Appendix A), every K steps.

    The fixed-batch estimator (:func:`contrastive.measure.noise_scale.fixed_batch_noise_scale`): at
    the parameters after a measured step ``s``, the full gradients (before clipping; the
    step's own gradient cache, ring and loss) of ``m = --noise-batches`` batches of the run's
    batch size ``B``, those of steps ``s + 1 .. s + m`` (drawn from a second copy of the run's
    input pipeline, so the training batches are untouched; not yet trained on), give
    ``V = sum_j |g_j - gbar|^2 / (m - 1)``, ``|G|^2 = |gbar|^2 - V/m`` and
    ``B_simple = B V / |G|^2``. Each measurement stands alone (a pure function of the step's
    parameters, seed and step: a resumed run logs the same values, and
    :func:`measure_checkpoint` at checkpoint ``s`` gives them too);
    average ``noise_trace`` and ``noise_g2`` over measurements before dividing
    (:func:`contrastive.measure.noise_scale.combine`). Cost: ``m`` extra gradient computations of a
    batch per measurement (``m / K`` per step on average).

    With ``--adaptive-batch`` the estimate also decides when the batch grows
    (:mod:`contrastive.run.adaptive_batch`); the meter then measures at the batch size of the
    phase it is built for (``s.batch_size``), on the batches that phase trains on next.
    """

    def __init__(self, cfg: Config, s: Setup):
        self.grad = make_gradient_fn(s.graphdef, cfg.train, s.mesh)
        self.inputs = s.make_inputs()
        self.m, self.b = cfg.run.noise_batches, s.batch_size or cfg.run.batch_size

    def measure(self, step: int, state, key, data_step: int | None = None) -> dict[str, float]:
        """The estimate after loop step ``step``, whose batch was input step ``data_step``
        (default ``step``; they differ once an adaptive batch has grown)."""
        params, queue = state.params, state.queue
        first = step if data_step is None else data_step

        def batches():
            for j in range(1, 1 + self.m):
                yield step + j, self.inputs.for_step(first + j, params)[0]

        def grad(item):
            t, batch = item  # the key loop step t folds in (its dropout)
            return self.grad(params, batch, jax.random.fold_in(key, t - 1), queue)

        est = fixed_batch_noise_scale(grad, batches(), batch_size=self.b, num_batches=self.m)
        return {
            "noise_batches": self.m,
            "noise_variance": est.variance,
            "noise_variance_se": est.variance_se,
            "noise_g2": est.g2,
            "noise_trace": est.trace,
            "noise_b_simple": est.b_simple,
        }

    def close(self) -> None:
        self.inputs.close()
