"""Hard batches in training (``--hard-batches``): every batch is whole clusters of similar examples.

NGAME (Dahiya et al. 2023, "NGAME: Negative Mining-aware Mini-batching for Extreme
Classification") re-clusters the training set by the current model's embeddings every few
epochs and draws each mini-batch as a few whole clusters, so that an anchor's in-batch
negatives are its neighbours; TAS-Balanced (Hofstätter et al. 2021) does the same with topic
clusters. :func:`hard_batch_inputs` is that sampler as the loop's
:class:`~contrastive.inputs.step_inputs.StepInputs`:

- the order: :class:`~contrastive.inputs.hard_batches.HardBatchOrder` gives the global rows of
  every step's batch (random epochs until the first clustering, then epochs of whole
  clusters; every example once per epoch), the same on every process;
- a refresh (:meth:`HardBatchOrder.is_refresh_step`: after every ``--refresh-every`` steps,
  made at the next epoch start, where a clustering takes effect): the ``--cluster-tower``'s
  embeddings of all ``N`` training examples (un-augmented, in chunks of ``256`` rows per
  device, no gradients, rows split over the mesh with evaluation's jitted embedder, each
  process reading only its rows of each chunk), then
  :func:`~contrastive.inputs.clustering.balanced_clusters` into groups of ``--cluster-size``
  (``k = ceil(N / c)`` spherical k-means, ``KMEANS_ITERATIONS`` Lloyd iterations, a key fixed
  by the seed and the step; process 0's groups are broadcast so all processes agree);
- the batch: each process reads only its rows (``host_rows``) from ``data.train_source``,
  transformed as the random pipeline transforms them (``shapes`` and locked features: as
  they are; images: the same per-example conversion and augmentation, drawn with
  ``default_rng([seed + 1, stream position])``), then ``make_batch`` and the mesh;
- duplicates: the loss always gets ids. ``shapes``: caption ids (hard batches gather
  near-identical captions, so equal captions in a batch are common; they must not be each
  other's negatives). Other data sets: the example index. Labels are not ids: instance
  discrimination (SimCLR) treats other images of a class as negatives, and clusters of
  similar images are mostly one class, so label ids would remove exactly the negatives hard
  batches bring in; the example index only keeps an example drawn twice in one batch (a
  batch that straddles two epochs) from being its own negative;
- metrics: ``hard_negatives`` every step on ``shapes``
  (:func:`~contrastive.inputs.step_inputs.hard_negatives_metric`), ``refresh_s`` (wall seconds) on
  refresh steps and ``refresh_total_s`` (all refreshes of the run so far) every step;
- resume: the state is the step and :meth:`HardBatchOrder.state`, its group ids stored as
  zlib + base64 of their int32 bytes (:func:`encode_order_state`), so a resumed run draws
  exactly the uninterrupted run's batches: a clustering is restored, never recomputed.

Refresh cost: reading and embedding ``N`` examples (one forward pass over the data set)
plus ``2·iterations·N·k·D`` multiply-adds of k-means; ``experiments.bench_clustering``
measures the latter.
"""

from __future__ import annotations

import base64
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from contrastive.configs import Config, ConfigError
from contrastive.data import text
from contrastive.inputs.clustering import balanced_clusters
from contrastive.inputs.hard_batches import HardBatchOrder
from contrastive.inputs.step_inputs import hard_negatives_metric
from contrastive.mesh import shard_batch

__all__ = [
    "KMEANS_ITERATIONS",
    "HardBatchInputs",
    "hard_batch_inputs",
    "check_hard_batches",
    "encode_order_state",
    "decode_order_state",
]

KMEANS_ITERATIONS = 10  # Lloyd iterations per refresh (NGAME's clusters need not be converged)
EMBED_ROWS_PER_DEVICE = 256  # the refresh's chunk: evaluation's, so their compilations are shared
_KMEANS_STREAM = 0x4E47414D  # folded into the run's seed: k-means' own random stream

Reader = Callable[[np.ndarray, np.ndarray], dict]  # (examples int[b], positions int[b]) -> host


def check_hard_batches(
    *, num_examples: int, batch_size: int, cluster_size: int, cluster_tower: str, kind: str
) -> None:
    """Settings hard batches cannot use: a one-line :class:`ConfigError` that says what to do.

    A batch is ``B / c`` of the ``G = ceil(N / c)`` clusters: with ``G <= B / c`` (``N <=
    B``) there are no more clusters than one batch takes, so every batch is the whole
    training set and clustering changes nothing. ``c = 1`` makes every example its own
    cluster (random batches) at the price of k-means with ``N`` clusters.

    >>> try:
    ...     check_hard_batches(num_examples=64, batch_size=64, cluster_size=8,
    ...                        cluster_tower="image", kind="image_text")
    ... except ConfigError as e:
    ...     print(str(e)[:71])
    --hard-batches: 64 training examples make 8 clusters of 8, no more than
    """
    n, b, c = num_examples, batch_size, cluster_size
    if c > b or b % c:
        raise ConfigError(f"--cluster-size {c} must divide --batch-size {b}: use a divisor of it")
    if c < 2:
        raise ConfigError(
            "--cluster-size 1 makes every example its own cluster (random batches, with k-means "
            "over N clusters): use --cluster-size 2 or more"
        )
    if n <= b:
        raise ConfigError(
            f"--hard-batches: {n} training examples make {-(-n // c)} clusters of {c}, no more "
            f"than the {b // c} one batch of {b} takes (every batch would be the whole training "
            "set): train on more examples than --batch-size"
        )
    if cluster_tower == "text" and kind != "image_text":
        raise ConfigError(
            "--cluster-tower text needs an image-text data set; this one has two views of an "
            "image: use --cluster-tower image"
        )


def hard_batch_inputs(
    cfg: Config,
    data: Any,
    make_batch: Callable,
    mesh: jax.sharding.Mesh,
    graphdef: Any,
    *,
    tokenizer: Any = None,
) -> HardBatchInputs:
    """The hard-batch :class:`~contrastive.inputs.step_inputs.StepInputs` of ``cfg`` (module
    docstring).

    ``data``: the run's :class:`~contrastive.inputs.splits.RunData`; ``make_batch(host, step)``:
    this process's rows -> :class:`~contrastive.step.train_step.Batch`; ``graphdef``: the model's,
    for the refresh's embeddings; ``tokenizer``: the run's caption tokenizer (data sets of
    caption strings; None: built from ``cfg`` as the run's pipeline builds it).
    Bad settings: one-line :class:`ConfigError`.
    """
    from contrastive.data import get_spec

    d, r = cfg.data, cfg.run
    spec = get_spec(d.dataset, d.image_size)
    check_hard_batches(
        num_examples=data.num_train,
        batch_size=r.batch_size,
        cluster_size=d.cluster_size,
        cluster_tower=d.cluster_tower,
        kind=spec.kind,
    )
    try:
        order = HardBatchOrder(
            data.num_train, r.batch_size, d.cluster_size, r.seed, refresh_every=d.refresh_every
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    method = "embed_x" if d.cluster_tower == "image" else "embed_y"
    if tokenizer is None and spec.kind == "image_text" and not _own_tokens(spec):
        m = cfg.model  # the run's tokenizer, as the run's pipeline builds it
        vocab, length = text.text_shape(m.vocab_size, m.text_len, spec.vocab_size, spec.text_len)
        tokenizer = text.run_tokenizer(vocab, length, spec.kind)
    source, n = data.train_source, data.num_train
    inputs = _cluster_reader(spec, source, d.cluster_tower, tokenizer)
    return HardBatchInputs(
        order,
        read_batch=_batch_reader(spec, source, seed=r.seed, tokenizer=tokenizer),
        embed_training_set=lambda params: _embed(graphdef, params, method, mesh, inputs, n),
        make_batch=make_batch,
        mesh=mesh,
        seed=r.seed,
    )


class HardBatchInputs:
    """Every step's batch as whole clusters, re-clustered by the model at refresh steps.

    Loop step ``t`` (``1, 2, ...``) is the order's step ``s = t - 1`` (``s`` steps done).
    ``read_batch(examples, positions)``: this process's host dict of those examples, as the
    random pipeline makes it; ``embed_training_set(params)``: the cluster tower's embeddings
    ``float32[N, D]`` of every training example, the same on every process (a collective:
    every process calls it at the same step).
    """

    def __init__(
        self,
        order: HardBatchOrder,
        *,
        read_batch: Reader,
        embed_training_set: Callable[[Any], np.ndarray],
        make_batch: Callable,
        mesh: jax.sharding.Mesh,
        seed: int,
    ):
        self.order = order
        self._read_batch, self._embed = read_batch, embed_training_set
        self._make_batch, self._mesh, self._seed = make_batch, mesh, seed
        self._position = 0  # steps whose batch was served
        self._refresh_total = 0.0
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1)
        self._pending: tuple[int, Future] | None = None  # (order step, its host rows being read)
        self.host_examples: np.ndarray | None = None  # this process's rows of the last batch

    def for_step(self, step: int, params: Any) -> tuple[Any, dict[str, float]]:
        s = step - 1
        metrics: dict[str, float] = {}
        last = self.order.last_refresh_step
        if self.order.is_refresh_step(s) and (last is None or last < s):
            metrics["refresh_s"] = self.refresh(s, params)
        host, examples = self._host_batch(s)
        batch = _with_ids(self._make_batch(host, step), host, examples)
        if "caption_id" in host:
            metrics.update(hard_negatives_metric(host["caption_id"]))
        metrics["refresh_total_s"] = self._refresh_total
        self._position, self.host_examples = step, examples
        return shard_batch(batch, self._mesh), metrics

    def refresh(self, step: int, params: Any) -> float:
        """Cluster the training set by ``params``' embeddings for order step ``step``; seconds.

        Deterministic given the run's seed, ``step`` and ``params``.
        """
        t0 = time.perf_counter()
        points = self._embed(params)
        stream = jax.random.fold_in(jax.random.key(self._seed), _KMEANS_STREAM)
        key = jax.random.fold_in(stream, step)
        groups = balanced_clusters(
            points, cluster_size=self.order.cluster_size, iterations=KMEANS_ITERATIONS, key=key
        )
        groups = np.asarray(groups, np.int32)
        if jax.process_count() > 1:  # one clustering for all, whatever each device rounded
            from jax.experimental import multihost_utils

            groups = np.asarray(multihost_utils.broadcast_one_to_all(groups), np.int32)
        self.order.set_clustering(groups, refresh_step=step)
        self._pending = None
        seconds = time.perf_counter() - t0
        self._refresh_total += seconds
        return seconds

    def _host_batch(self, s: int) -> tuple[dict, np.ndarray]:
        """This process's host dict of order step ``s``, then the next one read in the background
        (unless a refresh may change it)."""
        examples, positions = self._rows(s)
        if self._pending is not None and self._pending[0] == s:
            host = self._pending[1].result()
        else:
            host = self._read_batch(examples, positions)
        self._pending = None
        if self._pool is not None and not self.order.is_refresh_step(s + 1):
            # The rows are computed here: the order's epoch cache is not thread-safe.
            self._pending = (s + 1, self._pool.submit(self._read_batch, *self._rows(s + 1)))
        return host, examples

    def _rows(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        p, count = jax.process_index(), jax.process_count()
        examples = self.order.host_rows(s, p, count)
        b = len(examples)
        return examples, s * self.order.batch_size + p * b + np.arange(b)  # stream positions

    def get_state(self) -> dict[str, Any]:
        return {
            "position": self._position,
            "order": encode_order_state(self.order.state()),
            "refresh_total_s": self._refresh_total,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        order = HardBatchOrder.from_state(decode_order_state(state["order"]))
        mine = self.order
        same = (order.num_examples, order.batch_size, order.cluster_size, order.seed)
        if same != (mine.num_examples, mine.batch_size, mine.cluster_size, mine.seed):
            raise ValueError(
                f"the checkpoint's hard-batch order {order!r} is not this run's {mine!r}: "
                "resume with the same settings"
            )
        order.refresh_every = mine.refresh_every
        self.order, self._pending = order, None
        self._position = int(state["position"])
        self._refresh_total = float(state.get("refresh_total_s", 0.0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None


# ---------------------------------------------------------------------- the state in JSON


def encode_order_state(state: dict[str, Any]) -> dict[str, Any]:
    """:meth:`HardBatchOrder.state` as JSON-able values: the group ids ``int32[m, N]`` as
    zlib + base64 of their little-endian bytes (about ``4·N·m`` bytes before compression).

    >>> order = HardBatchOrder(6, 2, 2, seed=0)
    >>> order.set_clustering(np.array([0, 0, 1, 1, 2, 2]), refresh_step=1)
    >>> back = HardBatchOrder.from_state(decode_order_state(encode_order_state(order.state())))
    >>> all((back.batch_indices(s) == order.batch_indices(s)).all() for s in range(1, 9))
    True
    """
    groups = np.ascontiguousarray(state["group_ids"], "<i4")
    out = {k: int(v) for k, v in state.items() if k not in ("refresh_steps", "group_ids")}
    out["refresh_steps"] = [int(v) for v in state["refresh_steps"]]
    out["group_ids_shape"] = list(groups.shape)
    out["group_ids_zlib_b64"] = base64.b64encode(zlib.compress(groups.tobytes(), 6)).decode()
    return out


def decode_order_state(encoded: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_order_state`."""
    state = {k: v for k, v in encoded.items() if not k.startswith("group_ids")}
    raw = zlib.decompress(base64.b64decode(encoded["group_ids_zlib_b64"]))
    shape = tuple(encoded["group_ids_shape"])
    state["group_ids"] = np.frombuffer(raw, "<i4").reshape(shape).astype(np.int32)
    state["refresh_steps"] = np.asarray(encoded["refresh_steps"], np.int64)
    return state


# ---------------------------------------------------------------------- reading and embedding


def _with_ids(batch: Any, host: dict, examples: np.ndarray) -> Any:
    """``batch`` with the loss's ids: ``make_batch``'s (caption ids with hard batches), else the
    caption ids, else the example indices (module docstring)."""
    if batch.ids is not None:
        return batch
    ids = host.get("caption_id", examples)
    if len(batch.y) != len(ids):  # extra caption rows need make_batch's interleaved ids
        raise RuntimeError(
            "hard batches need the caption ids of the extra negatives: batch_builder must keep "
            "ids when --hard-batches is set"
        )
    return batch._replace(ids=np.asarray(ids, np.int32))


def _own_tokens(spec: Any) -> bool:
    return spec.kind == "image_text" and spec.vocab_size is not None


def _batch_reader(spec: Any, source: Any, *, seed: int, tokenizer: Any = None) -> Reader:
    """(examples, stream positions) -> host dict, transformed as by ``train_dataset``."""
    from contrastive.data import examples as per_example

    if _own_tokens(spec):  # shapes, locked features: as they are (no augmentation)
        rows = per_example.own_token_batch(spec, source)
        return lambda examples, positions: rows(examples)
    if spec.kind == "image":
        one = per_example.two_views_transform(spec)
    else:
        one = per_example.image_text_transform(spec, tokenizer)
    seed = seed + 1  # the random pipeline's augmentation seed

    def read(examples: np.ndarray, positions: np.ndarray) -> dict:
        out = [
            one(source[int(i)], np.random.default_rng([seed, int(p)]))
            for i, p in zip(examples, positions, strict=True)
        ]
        return {k: np.stack([o[k] for o in out]) for k in out[0]}

    return read


def _cluster_reader(spec: Any, source: Any, tower: str, tokenizer: Any = None):
    """examples -> the cluster tower's inputs, un-augmented (as evaluation reads them)."""
    from contrastive.data import examples as per_example
    from contrastive.data.augment import eval_view

    key = "image" if tower == "image" else "text"
    if _own_tokens(spec):
        tokens = _shapes_tokens(source) if key == "text" else None
        if tokens is not None:  # generated captions: no image rendered for nothing
            return lambda examples: tokens[examples]
        rows = per_example.own_token_batch(spec, source)
        return lambda examples: rows(examples)[key]
    if key == "image":
        size = spec.image_size
        return lambda examples: np.stack(
            [eval_view(per_example.to_float(source[int(i)]["image"]), size) for i in examples]
        ).astype(np.float32)
    return lambda examples: np.stack(
        [tokenizer(per_example.first_caption(source[int(i)])) for i in examples]
    )


def _shapes_tokens(source: Any) -> np.ndarray | None:
    """Caption tokens of generated ``shapes`` examples ``[0, N)``, without rendering (or None)."""
    from contrastive.data.captioned_shapes import CaptionedShapes
    from contrastive.data.sources import Subrange
    from contrastive.models.locked_tower import shapes_captions

    base = source.source if isinstance(source, Subrange) and source.start == 0 else source
    if not isinstance(base, CaptionedShapes):
        return None
    return shapes_captions(base.split, len(source), data_seed=base.seed)[0]


def _embed(
    graphdef: Any,
    params: Any,
    method: str,
    mesh: jax.sharding.Mesh,
    read: Callable[[np.ndarray], np.ndarray],
    num_examples: int,
) -> np.ndarray:
    """``model.<method>`` of examples ``[0, N)`` -> ``float32[N, D]`` on every process.

    Chunks of ``R = min(256·n, ceil(N / n)·n)`` rows for ``n`` devices (evaluation's size, a
    multiple of the device count): chunk ``j`` is examples ``[j·R, (j+1)·R)``, and process
    ``p`` of ``P`` reads only rows ``[p·R/P, (p+1)·R/P)`` of it (rows past ``N`` repeat
    example ``N - 1``, dropped after) and feeds them to its devices; the embeddings come back
    replicated (evaluation's jitted embedder, compiled once per model and tower).
    """
    from contrastive.measure.evaluate import embedder

    n, devices = num_examples, mesh.devices.size
    count, index = jax.process_count(), jax.process_index()
    apply = embedder(graphdef, params, method, mesh)
    rows = min(EMBED_ROWS_PER_DEVICE * devices, -(-n // devices) * devices)
    per_host = rows // count
    out = []
    for start in range(0, n, rows):
        mine = np.minimum(start + index * per_host + np.arange(per_host), n - 1)
        local = np.asarray(read(mine))
        chunk = np.zeros((rows, *local.shape[1:]), local.dtype)  # other processes' rows: unread
        chunk[index * per_host : (index + 1) * per_host] = local
        out.append(np.asarray(apply(chunk), np.float32)[: min(rows, n - start)])
    return np.concatenate(out)
