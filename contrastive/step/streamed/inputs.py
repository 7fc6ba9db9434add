"""The streamed gradient cache in training (``--stream``): chunk sources as step inputs.

GradCache (Gao et al. 2021, arXiv 2101.06983) keeps one chunk's activations at a time;
the streamed step (:mod:`contrastive.step.streamed.step`) also keeps one chunk of *raw inputs*
at a time, reading each chunk from the data twice (embed, then re-encode under ``vjp``).
Here that step meets the training loop:

- :class:`StreamedInputs` is a :class:`~contrastive.inputs.step_inputs.StepInputs` whose input for
  step ``s`` is a :class:`StepSource`: the chunk source of step ``s``. Chunk ``k`` holds
  this host's rows of the chunk (each local device's ``c / n`` rows, device-major), read
  example by example from the per-example view of the training pipeline
  (:func:`contrastive.data.pipeline.train_examples`) and collated only for those rows.
  Never the whole host batch.
- :func:`streamed_step_fn` makes the streamed step a loop step,
  ``step_fn(state, source, key) -> (state, metrics)``.

The order is the in-memory pipeline's, bit for bit: the loop's step ``s`` (``1, 2, ...``)
reads element ``s - 1`` of :func:`~contrastive.data.pipeline.train_dataset`, whose rows
``j`` of host ``p`` of ``P`` are the examples ``((s - 1) P + p) b + j`` of the per-example
view (``b`` rows per host). The host batch dict of a chunk's rows becomes a
:class:`~contrastive.step.train_step.Batch` by the run's own ``make_batch``
(:func:`contrastive.run.assemble.batch_builder`). So ``--stream`` trains on the very batches of
the in-memory step, and, the streamed step being exact, to the same losses and parameters
(float32 rounding).

Example (what :func:`contrastive.run.assemble.setup` does with ``--stream``)::

    inputs = streamed_inputs(cfg, data, make_batch, mesh)
    step_fn = streamed_step_fn(graphdef, cfg.train, mesh, tx=tx)
    source, _ = inputs.for_step(1, state.params)
    state, metrics = step_fn(state, source, key)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from contrastive.configs import Config, TrainConfig
from contrastive.data.pipeline import TrainExamples
from contrastive.step.streamed.step import (
    Chunk,
    ChunkSource,
    example_rows,
    make_streamed_step,
    rows_source,
)
from contrastive.step.train_step import TrainState

__all__ = ["StepSource", "StreamedInputs", "streamed_inputs", "streamed_step_fn"]


class StepSource:
    """The :class:`~contrastive.step.streamed.step.ChunkSource` of one step of the run.

    ``step``: the loop's step (``1, 2, ...``) whose chunks ``read`` returns; ``read(step,
    chunk)`` must be asked for that step (the streamed step passes it back).
    """

    def __init__(self, step: int, source: ChunkSource):
        self.step = step
        self._source = source
        self.batch_sizes = source.batch_sizes

    @property
    def num_chunks(self) -> int:
        return self._source.num_chunks

    def read(self, step: int, chunk: int) -> Chunk:
        if step != self.step:
            raise ValueError(f"the source of step {self.step} was asked for step {step}")
        return self._source.read(step, chunk)


class StreamedInputs:
    """Every step's chunk source, read from the per-example view of the training data.

    Args:
      examples: the training examples in their global order (:class:`TrainExamples`).
      make_batch: ``f(host batch dict, step) -> Batch`` (``x`` [r, ...], ``y`` [r, ...],
        ``ids``, ``valid``), applied to the collated rows of one chunk.
      mesh: the run's mesh; its data axis splits the rows.
      chunk_size: the global rows per chunk (``--chunk-size``, a multiple of the devices).

    The position (the steps done) is the whole state, as for the in-memory inputs: a
    chunk's rows are a pure function of the step.
    """

    def __init__(
        self,
        examples: TrainExamples,
        make_batch: Callable[[dict, int], Any],
        *,
        mesh: jax.sharding.Mesh,
        chunk_size: int,
    ):
        rows = example_rows(
            examples.examples,
            collate=examples.collate,
            host_batch_size=examples.host_batch_size,
            process_index=examples.process_index,
            process_count=examples.process_count,
        )

        def step_rows(step: int, index: np.ndarray) -> tuple:
            # Loop step s (1-based) trains on pipeline element s - 1, as BatchInputs does.
            return tuple(make_batch(rows(step - 1, index), step))

        self._source = rows_source(
            step_rows, batch_size=examples.global_batch_size, mesh=mesh, chunk_size=chunk_size
        )
        self._position = 0

    def for_step(self, step: int, params: Any) -> tuple[StepSource, dict[str, float]]:
        del params  # random batches do not depend on the model
        self._position = step  # saved with the step's checkpoint: `step` batches are done
        return StepSource(step, self._source), {}

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._position = int(state["position"])

    def close(self) -> None:
        pass  # nothing held between steps: the step's reads end with the step


def streamed_inputs(
    cfg: Config,
    data: Any,
    make_batch: Callable[[dict, int], Any],
    mesh: jax.sharding.Mesh,
) -> StreamedInputs:
    """The :class:`StreamedInputs` of a run (``--stream``): the training examples of its
    data (:class:`~contrastive.inputs.splits.RunData`, ``data.examples``: the order of the
    in-memory batches, one example at a time), ``make_batch`` and mesh."""
    return StreamedInputs(data.examples, make_batch, mesh=mesh, chunk_size=cfg.train.chunk_size)


def streamed_step_fn(
    graphdef: nnx.GraphDef,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    *,
    tx: optax.GradientTransformation,
    prefetch: bool = True,
):
    """``step_fn(state, source, key) -> (state, metrics)``: the streamed step as a loop step.

    ``source``: a :class:`StepSource` (from :meth:`StreamedInputs.for_step`); the step
    reads its chunks twice (see :func:`contrastive.step.streamed.step.make_streamed_step`) and
    raises :class:`~contrastive.step.streamed.step.ChunkReadError`, nothing updated and the
    state passed in still valid, when a chunk cannot be read or reads different bytes in
    the second pass. ``step_fn.loss_and_grads(state, source, key) -> ((loss, aux),
    grads)``: the gradients the update would use, nothing updated.
    """
    step = make_streamed_step(graphdef, config, mesh, tx=tx, prefetch=prefetch)

    def step_fn(
        state: TrainState, source: StepSource, key: jax.Array | None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        return step(state, source, source.step, key)

    def loss_and_grads(state: TrainState, source: StepSource, key: jax.Array | None):
        return step.loss_and_grads(state, source, source.step, key)

    step_fn.loss_and_grads = loss_and_grads
    return step_fn
