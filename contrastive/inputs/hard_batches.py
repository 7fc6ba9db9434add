"""Hard mini-batches: each global batch is a few whole clusters of similar examples.

NGAME (Dahiya et al. 2023, "NGAME: Negative Mining-aware Mini-batching for Extreme
Classification") re-clusters the training points by their current embeddings every few
epochs and forms each mini-batch from whole clusters, so that the in-batch negatives of an
anchor are its neighbours rather than random points; TAS-Balanced (Hofstätter et al. 2021)
does the same with topic clusters of queries. :class:`HardBatchOrder` is that sampler for
our step-indexed, multi-host training: it says which global rows make up the batch of any
step, the same on every host. :mod:`contrastive.inputs.clustering` makes the clusters.

The order. Examples are drawn as a stream of epochs, as the plain shuffled pipeline draws
them: epoch ``e`` is a permutation of ``range(N)`` occupying stream positions
``[e·N, (e+1)·N)``, and the global batch of step ``s`` is positions ``[s·B, (s+1)·B)``
(a batch may straddle two epochs). So every example is drawn exactly once per epoch,
clustered or not. Before the first clustering an epoch is a uniform random permutation.
With a clustering (``G = ceil(N/c)`` groups of exactly ``c`` examples, one smaller group
``R`` of ``N mod c`` allowed, as :func:`contrastive.inputs.clustering.balanced_clusters` makes
them), the epoch is laid out as

    [X_head (a)] [the other full groups, in random order] [R (N mod c)] [X_tail (c - a)]

where ``a = f mod c`` and ``f = (-e·N) mod B`` is the number of the epoch's first positions
that complete the batch the previous epoch started; ``X`` is the first full group of the
random group order (not split when ``a = 0``). Batch boundaries then fall on group
boundaries throughout the middle part: with ``c | B`` every batch lying in it is the union
of ``B / c`` whole groups chosen at random. Only the few batches near an epoch boundary
(within ``2c`` positions before it or ``c`` after it) mix partial groups: the "trimmed"
batches. With ``c | N`` and ``B | N`` every batch is ``B / c`` whole groups. Members of a
group appear in a random order (so which members of ``X`` are split off varies).

Refreshes. ``set_clustering(group_ids, refresh_step=r)`` makes a clustering available from
step ``r`` on; it is used from the first epoch that starts at a stream position ``>= r·B``,
so a batch never mixes two clusterings within one epoch and a refresh never changes a batch
of a step before ``r``. The schedule, :meth:`HardBatchOrder.is_refresh_step`, re-clusters
after every ``refresh_every`` steps (NGAME re-clusters every few epochs) but computes each
clustering only when it takes effect: at the step whose batch holds the first epoch start
at or after step ``m·refresh_every`` (``m = 1, 2, ...``), i.e. step ``s = e·N // B`` of epoch
``e >= 1`` such that a multiple of ``refresh_every`` lies in ``(s_{e-1}, s]`` (``s_0 = 0``).
Clustering at ``m·refresh_every`` itself would feed the same epochs, with parameters up to
an epoch older, and would compute clusterings that a later one replaces before any epoch
uses them; a ``refresh_every`` shorter than an epoch thus means a refresh every epoch.

Randomness. Epoch ``e``'s permutation comes from ``np.random.default_rng([seed, e])`` and
the clustering in effect: deterministic given ``(seed, e, group ids)``, whatever the
process count. Every host computes the whole epoch order (``O(N log N)``, under 0.5 s per
epoch at N = 1M) and keeps its own rows of each batch (:meth:`HardBatchOrder.host_rows`).

Resume. The state to checkpoint is :meth:`HardBatchOrder.state`: the constructor's
arguments (``seed`` among them) and the clusterings still in effect, at most two
``(refresh_step, int32[N] group ids)`` pairs (the current one, and the one before while an
epoch that started under it is unfinished). ``HardBatchOrder.from_state(state)`` then gives
exactly the same batches for every later step. Saving the group ids (4 bytes per example)
is the exact way; recomputing them from the checkpoint of the refresh step is exact only on
the same hardware and software, because k-means assignments can flip on float rounding.

Metrics (logged by training to compare random and hard batches) are
:mod:`contrastive.inputs.batch_hardness`, handed on here: :func:`hard_negative_count`
counts, for the ``shapes`` data set, each anchor's batch-mates whose caption is one
attribute away; :func:`nearest_negative_rank`, for any data set, ranks each anchor's
hardest in-batch negative among all ``N`` examples.

Example::

    >>> import numpy as np
    >>> order = HardBatchOrder(12, 4, 2, seed=0)
    >>> epoch = np.concatenate([order.batch_indices(s) for s in range(3)])
    >>> sorted(epoch.tolist()) == list(range(12))
    True
    >>> order.set_clustering(np.arange(12) // 2, refresh_step=3)   # pairs (0,1), (2,3), ...
    >>> batch = order.batch_indices(3)
    >>> sorted(set((batch // 2).tolist())) == sorted((batch // 2).tolist()[::2])  # 2 whole pairs
    True
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import numpy as np

from contrastive.inputs.batch_hardness import hard_negative_count, nearest_negative_rank

__all__ = ["HardBatchOrder", "first_hard_step", "hard_negative_count", "nearest_negative_rank"]

_CACHED_EPOCHS = 3  # a batch spans at most 2 epochs; one more for a host that runs behind


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class HardBatchOrder:
    """Global rows of every step's batch: random epochs, then epochs of whole clusters.

    See the module docstring for the layout, the refresh rule and what to checkpoint.

    Args:
      num_examples: ``N``, the training set's size; at least ``batch_size``.
      batch_size: ``B``, the global batch; a multiple of ``cluster_size``.
      cluster_size: ``c``, the examples per cluster, ``1 <= c <= B``.
      seed: the sampler's seed (one permutation stream per seed).
      refresh_every: steps between clusterings, for :meth:`is_refresh_step` (each one made
        at the next epoch start); at least 1.

    Example::

        >>> order = HardBatchOrder(1000, 64, 16, seed=0, refresh_every=30)
        >>> [s for s in range(70) if order.is_refresh_step(s)]   # due at 30, 60: epochs 2, 4
        [31, 62]
        >>> order.host_rows(5, process_index=1, process_count=4).shape
        (16,)
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        cluster_size: int,
        seed: int,
        *,
        refresh_every: int = 1,
    ):
        n = _check_int("num_examples", num_examples, 1)
        b = _check_int("batch_size", batch_size, 1)
        c = _check_int("cluster_size", cluster_size, 1)
        seed = _check_int("seed", seed, 0)
        refresh_every = _check_int("refresh_every", refresh_every, 1)
        if c > b:
            raise ValueError(f"cluster_size {c} exceeds batch_size {b}: use cluster_size <= {b}")
        if b % c:
            raise ValueError(
                f"batch_size {b} is not a multiple of cluster_size {c}: use a cluster size "
                f"that divides the batch (e.g. {max(d for d in range(1, c + 1) if b % d == 0)})"
            )
        if n < b:
            raise ValueError(f"{n} examples cannot fill a batch of {b}: use batch_size <= {n}")
        self.num_examples, self.batch_size, self.cluster_size = n, b, c
        self.seed, self.refresh_every = seed, refresh_every
        self._clusterings: list[tuple[int, np.ndarray]] = []  # (refresh step, group ids)
        self._first_step = 0  # the first step served (later after old clusterings are dropped)
        self._orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"HardBatchOrder({self.num_examples}, {self.batch_size}, {self.cluster_size}, "
            f"seed={self.seed}, refresh_every={self.refresh_every})"
        )

    # ------------------------------------------------------------------ schedule

    @property
    def num_groups(self) -> int:
        """``G = ceil(N / c)``, the groups a clustering must have."""
        return -(-self.num_examples // self.cluster_size)

    @property
    def last_refresh_step(self) -> int | None:
        """The refresh step of the newest clustering set, None before the first."""
        return self._clusterings[-1][0] if self._clusterings else None

    def epoch_of_step(self, step: int) -> int:
        """The epoch of the first row of step ``step``'s batch: ``s·B // N``."""
        return _check_int("step", step, 0) * self.batch_size // self.num_examples

    def refresh_step(self, epoch: int) -> int:
        """The step whose batch holds epoch ``epoch``'s first position: ``e·N // B``.

        A clustering set with this ``refresh_step`` is the one epoch ``epoch`` uses.
        """
        return _check_int("epoch", epoch, 0) * self.num_examples // self.batch_size

    def is_refresh_step(self, step: int) -> bool:
        """Whether to re-cluster before step ``step`` (``step`` steps done): its batch holds the
        start of an epoch ``e >= 1``, and a refresh fell due (a multiple of ``refresh_every``)
        after the step that held the start of epoch ``e - 1`` (module docstring)."""
        step = _check_int("step", step, 0)
        n, b, every = self.num_examples, self.batch_size, self.refresh_every
        epoch = -(-step * b // n)  # the first epoch starting at or after position s·B
        if epoch < 1 or epoch * n >= (step + 1) * b:
            return False  # no epoch starts in this batch
        return step // every > self.refresh_step(epoch - 1) // every

    # ------------------------------------------------------------------ clusterings

    def set_clustering(self, group_ids: np.ndarray | jax.Array, refresh_step: int) -> None:
        """Use ``group_ids`` (``int[N]``, groups ``0..G-1``) from step ``refresh_step`` on.

        It takes effect at the first epoch starting at a position ``>= refresh_step·B``
        (module docstring), so batches of earlier steps stay what they were. Refresh steps
        must not decrease. Clusterings no later step can use are dropped.
        """
        refresh_step = _check_int("refresh_step", refresh_step, 0)
        if self._clusterings and refresh_step < self._clusterings[-1][0]:
            raise ValueError(
                f"refresh_step {refresh_step} precedes the last refresh at step "
                f"{self._clusterings[-1][0]}: refreshes must come in step order"
            )
        groups = self._check_groups(group_ids)
        if self._clusterings and self._clusterings[-1][0] == refresh_step:
            self._clusterings.pop()  # a second clustering for the same step replaces the first
        self._clusterings.append((refresh_step, groups))
        # Steps >= refresh_step need epochs >= first; keep the clustering that epoch uses and
        # the newer ones. Steps before refresh_step may have used a dropped one: stop serving
        # them (a training loop only moves forward).
        keep = self._index_for_epoch(self.epoch_of_step(refresh_step))
        if keep > 0:
            self._clusterings = self._clusterings[keep:]
            self._first_step = refresh_step
        self._orders.clear()

    def _check_groups(self, group_ids) -> np.ndarray:
        g = np.asarray(group_ids)
        n, c, num = self.num_examples, self.cluster_size, self.num_groups
        if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(
                f"group_ids must be int[{n}] (one group per example), got {g.dtype}{list(g.shape)}"
            )
        if g.min() < 0 or g.max() >= num:
            raise ValueError(
                f"group ids must lie in [0, {num}) for {n} examples in groups of {c}, "
                f"got {g.min()}..{g.max()}; make them with balanced_clusters"
            )
        counts = np.bincount(g, minlength=num)
        expected = np.full(num, c)
        expected[0] = n - (num - 1) * c  # the one smaller group, if any, sorted first
        if not np.array_equal(np.sort(counts), expected):
            raise ValueError(
                f"groups must have exactly {c} examples each (one may have {n % c or c}), got "
                f"sizes {np.unique(counts).tolist()}; make them with balanced_clusters"
            )
        return g.astype(np.int32)

    def _index_for_epoch(self, epoch: int) -> int:
        """Index into ``_clusterings`` of the one epoch ``epoch`` uses; -1: none (random)."""
        start = epoch * self.num_examples  # the epoch's first stream position
        index = -1
        for i, (step, _) in enumerate(self._clusterings):
            if step * self.batch_size <= start:
                index = i
        return index

    # ------------------------------------------------------------------ the order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``int64[N]``: the permutation of ``range(N)`` that epoch ``epoch`` draws."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch < self.epoch_of_step(self._first_step):
            raise ValueError(
                f"epoch {epoch} precedes step {self._first_step}, the first this sampler "
                "serves since it dropped older clusterings; ask for later steps"
            )
        index = self._index_for_epoch(epoch)
        cache_key = (epoch, self._clusterings[index][0] if index >= 0 else -1)
        if cache_key in self._orders:
            self._orders.move_to_end(cache_key)
            return self._orders[cache_key]
        rng = np.random.default_rng([self.seed, epoch])
        if index == -1:
            order = rng.permutation(self.num_examples)
        else:
            order = self._clustered_order(epoch, self._clusterings[index][1], rng)
        self._orders[cache_key] = order
        while len(self._orders) > _CACHED_EPOCHS:
            self._orders.popitem(last=False)
        return order

    def _clustered_order(
        self, epoch: int, groups: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        n, b, c, num = self.num_examples, self.batch_size, self.cluster_size, self.num_groups
        within = rng.permutation(n)  # a random rank per example: order inside a group
        group_order = rng.permutation(num)  # the random order of the groups
        counts = np.bincount(groups, minlength=num)
        small = int(np.argmin(counts)) if n % c else -1  # R, laid out after the full groups
        # Slots: 0 = X_head, 1 + rank = full group in random order, num + 1 = R, num + 2 = X_tail.
        slot_of_group = np.empty(num, np.int64)
        slot_of_group[group_order] = 1 + np.arange(num)
        if small >= 0:
            slot_of_group[small] = num + 1
        slot = slot_of_group[groups]
        a = ((-epoch * n) % b) % c  # positions before the first group-aligned batch boundary
        if a:
            x = int(group_order[group_order != small][0])  # X: first full group in the order
            members = np.flatnonzero(groups == x)
            members = members[np.argsort(within[members])]
            slot[members[:a]] = 0
            slot[members[a:]] = num + 2
        # One sort on (slot, random rank): keys are distinct, so the order is well defined.
        return np.argsort(slot * n + within, kind="stable")

    def batch_indices(self, step: int) -> np.ndarray:
        """``int64[B]``: the global example indices of step ``step``'s batch, in row order."""
        step = _check_int("step", step, 0)
        if step < self._first_step:
            raise ValueError(
                f"step {step} precedes step {self._first_step}, the first this sampler serves "
                "since it dropped older clusterings; ask for later steps"
            )
        n, b = self.num_examples, self.batch_size
        start, stop = step * b, (step + 1) * b
        parts = []
        for epoch in range(start // n, (stop - 1) // n + 1):  # one or two epochs (B <= N)
            lo, hi = max(start, epoch * n) - epoch * n, min(stop, (epoch + 1) * n) - epoch * n
            parts.append(self.epoch_order(epoch)[lo:hi])
        return np.concatenate(parts).astype(np.int64)

    def host_rows(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """``int64[B/P]``: host ``process_index``'s consecutive rows of step ``step``'s batch.

        Rows ``[p·B/P, (p+1)·B/P)`` of :meth:`batch_indices`, so concatenating the hosts'
        rows gives the same global batch for any process count ``P`` dividing ``B``.
        """
        p = _check_int("process_count", process_count, 1)
        i = _check_int("process_index", process_index, 0)
        if i >= p:
            raise ValueError(f"process_index {i} is out of range for {p} processes")
        if self.batch_size % p:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by {p} processes: "
                f"use a multiple of {p}"
            )
        rows = self.batch_size // p
        return self.batch_indices(step)[i * rows : (i + 1) * rows]

    # ------------------------------------------------------------------ resume

    def state(self) -> dict[str, Any]:
        """What to checkpoint for an exact resume (plain ints and NumPy arrays).

        ``{"num_examples", "batch_size", "cluster_size", "seed", "refresh_every",
        "first_step", "refresh_steps": int64[m], "group_ids": int32[m, N]}`` with ``m <= 2``
        clusterings (``m = 0`` before the first refresh); ``first_step`` is the first step
        served (older clusterings were dropped).
        """
        n = self.num_examples
        return {
            "num_examples": n,
            "batch_size": self.batch_size,
            "cluster_size": self.cluster_size,
            "seed": self.seed,
            "refresh_every": self.refresh_every,
            "first_step": self._first_step,
            "refresh_steps": np.array([s for s, _ in self._clusterings], np.int64),
            "group_ids": np.stack([g for _, g in self._clusterings])
            if self._clusterings
            else np.zeros((0, n), np.int32),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HardBatchOrder:
        """The sampler :meth:`state` describes: the same batches for every step it serves."""
        order = cls(
            int(state["num_examples"]),
            int(state["batch_size"]),
            int(state["cluster_size"]),
            int(state["seed"]),
            refresh_every=int(state["refresh_every"]),
        )
        steps, groups = np.asarray(state["refresh_steps"]), np.asarray(state["group_ids"])
        if len(steps) != len(groups):
            raise ValueError(f"state has {len(steps)} refresh steps but {len(groups)} clusterings")
        for step, g in zip(steps.tolist(), groups, strict=True):
            order.set_clustering(g, refresh_step=int(step))
        order._first_step = _check_int("first_step", int(state["first_step"]), 0)
        return order


# ---------------------------------------------------------------------- schedule


def first_hard_step(num_examples: int, batch_size: int, refresh_every: int) -> int:
    """The first training step (1-based) whose batch holds clustered rows.

    Before step ``s`` (``s - 1`` steps done) the loop re-clusters when
    :meth:`HardBatchOrder.is_refresh_step` ``(s - 1)``: the first clustering falls due after
    ``refresh_every`` steps and takes effect at the next epoch start, so every earlier step
    is a random batch. A run that ends before this step never trains on a hard batch.

    >>> first_hard_step(256, 64, 4)   # 4 steps an epoch, due after 4: epoch 1 starts step 5
    5
    >>> first_hard_step(1000, 64, 30)  # due after 30; epoch 2 starts in step 32's batch
    32
    """
    order = HardBatchOrder(num_examples, batch_size, 1, seed=0, refresh_every=refresh_every)
    s = refresh_every
    while not order.is_refresh_step(s):  # within about two epochs of the due step
        s += 1
    return s + 1
