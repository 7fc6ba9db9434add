"""What the training loop feeds the step, step after step.

The loop (:mod:`contrastive.run.loop`) asks a :class:`StepInputs` for the input of each step
and hands it to the run's step function, ``step_fn(state, input, key)``. Where the input
comes from is the only thing that differs between the ways of drawing a batch:

- :class:`BatchInputs` (the default): this host's rows of the step's global batch, read from
  the grain pipeline (the next one prefetched on a thread), placed on the mesh whole;
- the streamed gradient cache (``--stream``): a chunk source the step reads twice;
- hard batches (``--hard-batches``): the rows of whole clusters of similar examples.

The inputs' position is part of the checkpoint (``get_state``/``set_state``: JSON), so a
resumed run draws exactly the batches an uninterrupted one would.

On a data set with caption ids (``shapes``) every step logs ``hard_negatives``
(:func:`hard_negatives_metric`): the mean number of batch-mates one attribute away from an
anchor's caption, over the global batch, for random and hard batches alike, so a study can
compare how hard the in-batch negatives of the two are (not with ``--stream``, whose steps
never hold their batch).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from contrastive.data import BatchIterator
from contrastive.inputs.hard_batches import hard_negative_count
from contrastive.mesh import shard_batch

__all__ = ["StepInputs", "BatchInputs", "hard_negatives_metric"]


@runtime_checkable
class StepInputs(Protocol):
    """The source of every step's input.

    ``for_step(step, params)``: the input of step ``step`` (``1, 2, ...``: the step being
    computed; the steps before it are done) and extra metrics for that step's log record
    (may be empty). ``params`` are the parameters the step starts from (for inputs that
    depend on the model, e.g. hard batches clustered by its embeddings); the input must be
    a pure function of the run's config, ``step`` and the state restored with
    ``set_state``, so that a resumed run sees the same inputs. Reading errors propagate.
    """

    def for_step(self, step: int, params: Any) -> tuple[Any, dict[str, float]]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class BatchInputs:
    """The whole global batch of each step, this host's rows read from ``dataset``.

    ``dataset[i]``: this host's rows of the batch of the step after ``i`` steps (a grain
    ``MapDataset``, see :func:`contrastive.data.pipeline.train_dataset`); ``make_batch(host,
    step)`` turns them into a :class:`contrastive.step.train_step.Batch` of host arrays, which is
    placed on ``mesh`` with its rows split over the data axis.
    """

    def __init__(self, dataset: Any, make_batch: Any, mesh: jax.sharding.Mesh):
        self._batches = BatchIterator(dataset)
        self._make_batch = make_batch
        self._mesh = mesh

    def for_step(self, step: int, params: Any) -> tuple[Any, dict[str, float]]:
        del params  # random batches do not depend on the model
        if self._batches.position != step - 1:  # e.g. restored: the iterator jumps there
            self._batches.set_state({"position": step - 1})
        host = next(self._batches)
        extra = hard_negatives_metric(host["caption_id"]) if "caption_id" in host else {}
        return shard_batch(self._make_batch(host, step), self._mesh), extra

    def get_state(self) -> dict[str, Any]:
        return self._batches.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._batches.set_state(state)

    def close(self) -> None:
        self._batches.close()


def hard_negatives_metric(host_caption_ids: np.ndarray) -> dict[str, float]:
    """``{"hard_negatives": mean_i n1(i)}`` over the step's GLOBAL batch of ``shapes`` captions.

    ``n1(i)`` is the number of anchor ``i``'s batch-mates whose caption is exactly one
    attribute away from its own (:func:`contrastive.inputs.hard_batches.hard_negative_count`,
    ``O(B)`` NumPy): about ``(B - 1) / 189`` for a random batch of the ``train`` split, far
    more for the hard batches of NGAME (Dahiya et al. 2023). Each process passes its own rows'
    caption ids (``int[B / P]``); with several processes they are gathered first (``B``
    int32 per step), so the value is the same on every process and for any process count.

    Example::

        >>> from contrastive.data.captioned_shapes import caption_id
        >>> hard_negatives_metric(np.array([caption_id(0, 1, 0, 4, 0), caption_id(0, 1, 0, 4, 2)]))
        {'hard_negatives': 1.0}
    """
    ids = np.asarray(host_caption_ids).reshape(-1)
    if jax.process_count() > 1:  # every process needs the other processes' rows
        from jax.experimental import multihost_utils

        ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
    return {"hard_negatives": float(hard_negative_count(ids).mean())}
