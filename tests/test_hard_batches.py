"""The hard-batch sampler (contrastive.inputs.hard_batches): coverage, whole clusters, hosts,
determinism, resume, and the hardness metrics against brute force."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.data.captioned_shapes import (
    ATTRIBUTES,
    NUM_CAPTIONS,
    CaptionedShapes,
    caption_attributes,
    caption_id,
    expected_neighbours,
)
from contrastive.inputs.clustering import balanced_clusters
from contrastive.inputs.hard_batches import (
    HardBatchOrder,
    hard_negative_count,
    nearest_negative_rank,
)


def random_groups(n: int, c: int, seed: int) -> np.ndarray:
    """A balanced clustering at random: ceil(n/c) groups of c, one of n mod c."""
    return np.random.default_rng(seed).permutation(np.arange(n) // c).astype(np.int32)


@st.composite
def sampler_cases(draw):
    """(N, B, c, refresh steps): c | B <= N, up to two refreshes in the first epochs."""
    c = draw(st.integers(1, 8))
    b = c * draw(st.integers(1, 6))
    n = b + draw(st.integers(0, 3 * b + 20))
    steps_per_epoch = -(-n // b)
    r1 = draw(st.integers(0, 2 * steps_per_epoch))
    r2 = r1 + draw(st.integers(0, 2 * steps_per_epoch))
    refreshes = draw(st.sampled_from([(), (r1,), (r1, r2)]))
    return n, b, c, refreshes


def run_loop(order: HardBatchOrder, steps: range, refreshes, seed: int = 0):
    """Batches of ``steps`` as a training loop asks for them, clustering at each refresh step.

    Returns ``(batches, clusterings)``: the batches and the {refresh step: group ids} set.
    """
    clusterings, batches = {}, []
    for s in steps:
        for i, r in enumerate(refreshes):
            if r == s:
                clusterings[r] = random_groups(order.num_examples, order.cluster_size, seed + i)
                order.set_clustering(clusterings[r], refresh_step=r)
        batches.append(order.batch_indices(s))
    return batches, clusterings


def groups_of_epoch(order: HardBatchOrder, clusterings: dict, epoch: int):
    """The clustering epoch ``epoch`` uses: the latest with ``r·B <= epoch·N`` (or None)."""
    live = [r for r in clusterings if r * order.batch_size <= epoch * order.num_examples]
    return clusterings[max(live)] if live else None


@settings(max_examples=60)
@given(case=sampler_cases(), seed=st.integers(0, 2**16))
def test_every_example_is_drawn_once_per_epoch(case, seed):
    n, b, c, refreshes = case
    order = HardBatchOrder(n, b, c, seed)
    epochs = 4
    batches, _ = run_loop(order, range(-(-epochs * n // b)), refreshes, seed)
    stream = np.concatenate(batches)
    assert all(len(x) == b and x.dtype == np.int64 for x in batches)
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(stream[e * n : (e + 1) * n]), np.arange(n))


@settings(max_examples=60)
@given(case=sampler_cases(), seed=st.integers(0, 2**16))
def test_batches_are_unions_of_whole_clusters_away_from_epoch_boundaries(case, seed):
    n, b, c, refreshes = case
    order = HardBatchOrder(n, b, c, seed)
    epochs = 4
    steps = range(-(-epochs * n // b))
    batches, clusterings = run_loop(order, steps, refreshes, seed)
    checked = 0
    for s, batch in zip(steps, batches, strict=True):
        lo, hi = s * b, (s + 1) * b  # stream positions of the batch
        # The documented exception: batches within 2c positions before or c after a boundary.
        if any(lo < e * n + c and hi > e * n - 2 * c + 1 for e in range(1, epochs + 1)):
            continue
        groups = groups_of_epoch(order, clusterings, lo // n)
        if groups is None:
            continue
        sizes = np.bincount(groups)
        present = np.bincount(groups[batch], minlength=len(sizes))
        touched = np.flatnonzero(present)
        np.testing.assert_array_equal(present[touched], sizes[touched])  # whole groups only
        checked += 1
    # Not vacuous: a clustered epoch (the first at or after r·B) with room for an aligned batch
    # between its boundary windows has one checked batch at least.
    if refreshes and -(-refreshes[0] * b // n) < epochs and n - 3 * c + 1 >= 2 * b:
        assert checked > 0


@pytest.mark.parametrize(("n", "b", "c"), [(96, 24, 8), (64, 64, 16), (60, 12, 1)])
def test_every_batch_is_whole_clusters_when_everything_divides(n, b, c):
    order = HardBatchOrder(n, b, c, seed=7)
    groups = random_groups(n, c, 1)
    order.set_clustering(groups, refresh_step=0)
    for s in range(3 * n // b):
        counts = np.bincount(groups[order.batch_indices(s)], minlength=n // c)
        assert sorted(np.unique(counts).tolist()) == ([0, c] if b < n else [c])
        assert (counts == c).sum() == b // c


def test_cluster_choice_is_random_across_epochs():
    n, b, c = 240, 24, 4
    order = HardBatchOrder(n, b, c, seed=3)
    groups = random_groups(n, c, 0)
    order.set_clustering(groups, refresh_step=0)
    first = [frozenset(groups[order.batch_indices(s)].tolist()) for s in range(10)]
    second = [frozenset(groups[order.batch_indices(s)].tolist()) for s in range(10, 20)]
    assert len(set(first) | set(second)) == 20  # no batch's set of clusters repeats


@settings(max_examples=25)
@given(case=sampler_cases(), seed=st.integers(0, 2**16))
def test_global_batch_is_the_same_for_any_process_count(case, seed):
    n, b, c, refreshes = case
    steps = range(-(-3 * n // b))
    want, _ = run_loop(HardBatchOrder(n, b, c, seed), steps, refreshes, seed)
    for p in (1, 2, 4):
        if b % p:
            continue
        # Each "process" has its own sampler, as each host would.
        hosts = [HardBatchOrder(n, b, c, seed) for _ in range(p)]
        for s in steps:
            for host in hosts:
                for j, r in enumerate(refreshes):
                    if r == s:
                        host.set_clustering(random_groups(n, c, seed + j), refresh_step=r)
            rows = [host.host_rows(s, i, p) for i, host in enumerate(hosts)]
            assert all(len(r) == b // p for r in rows)
            np.testing.assert_array_equal(np.concatenate(rows), want[s])


def test_random_order_before_the_first_clustering():
    n, b = 50, 10
    order = HardBatchOrder(n, b, 5, seed=11)
    stream = np.concatenate([order.batch_indices(s) for s in range(15)])
    for e in range(3):  # the documented permutation: default_rng([seed, epoch])
        want = np.random.default_rng([11, e]).permutation(n)
        np.testing.assert_array_equal(stream[e * n : (e + 1) * n], want)
    assert not np.array_equal(stream[:n], stream[n : 2 * n])


def test_deterministic_and_seeded():
    a, b = HardBatchOrder(100, 20, 5, seed=1), HardBatchOrder(100, 20, 5, seed=1)
    other = HardBatchOrder(100, 20, 5, seed=2)
    groups = random_groups(100, 5, 0)
    for o in (a, b, other):
        o.set_clustering(groups, refresh_step=5)
    for s in range(20):
        np.testing.assert_array_equal(a.batch_indices(s), b.batch_indices(s))
    assert not np.array_equal(a.batch_indices(7), other.batch_indices(7))


def test_refresh_takes_effect_at_the_next_epoch_and_never_changes_the_past():
    n, b, c = 100, 16, 4  # epoch e starts at position 100e: in step floor(100e / 16)
    order = HardBatchOrder(n, b, c, seed=0)
    before = [order.batch_indices(s) for s in range(20)]
    groups = random_groups(n, c, 5)
    order.set_clustering(groups, refresh_step=4)  # 4·16 = 64 <= 100: used from epoch 1 on
    for s in range(6):  # steps 0..5 lie in epoch 0 (positions < 96); step 6 holds 100
        np.testing.assert_array_equal(order.batch_indices(s), before[s])
    assert not np.array_equal(order.epoch_order(1), HardBatchOrder(n, b, c, 0).epoch_order(1))
    np.testing.assert_array_equal(order.epoch_order(0), HardBatchOrder(n, b, c, 0).epoch_order(0))
    # Epoch 1 is laid out in whole groups after its X_head (a = (-100 mod 16) mod 4 = 0 here).
    e1 = order.epoch_order(1)
    assert all(len(set(groups[e1[i : i + c]].tolist())) == 1 for i in range(0, 96, c))


def test_refresh_schedule():
    # Epochs start in steps 6, 12, 18, 25, 31, 37; refreshes fall due at 12, 24, 36.
    order = HardBatchOrder(100, 16, 4, seed=0, refresh_every=12)
    assert [s for s in range(40) if order.is_refresh_step(s)] == [12, 25, 37]  # epochs 2, 4, 6
    short = HardBatchOrder(100, 16, 4, seed=0, refresh_every=2)  # shorter than an epoch
    assert [s for s in range(40) if short.is_refresh_step(s)] == [6, 12, 18, 25, 31, 37]
    assert order.refresh_step(2) == 12 and order.epoch_of_step(12) == 1  # 192 < 200 <= 208
    every = HardBatchOrder(100, 20, 4, seed=0)  # epochs start exactly at steps 5, 10, ...
    assert [s for s in range(16) if every.is_refresh_step(s)] == [5, 10, 15]
    # A clustering set at its refresh step is the one the new epoch uses.
    groups = random_groups(100, 4, 0)
    order.set_clustering(groups, refresh_step=order.refresh_step(2))
    fresh = HardBatchOrder(100, 16, 4, seed=0)
    fresh.set_clustering(groups, refresh_step=0)
    np.testing.assert_array_equal(order.epoch_order(2), fresh.epoch_order(2))
    assert not np.array_equal(order.epoch_order(1), fresh.epoch_order(1))


@settings(max_examples=60)
@given(
    n=st.integers(1, 200), b=st.integers(1, 40), every=st.integers(1, 30), span=st.integers(1, 12)
)
def test_refresh_steps_are_the_first_epoch_starts_after_each_due_step(n, b, every, span):
    """Brute force: a refresh falls due after every ``every`` steps; each one is made at the
    first step at or after it whose batch holds an epoch start (one refresh per such step)."""
    n = max(n, b)
    order = HardBatchOrder(n, b, 1, seed=0, refresh_every=every)
    steps = range(span * -(-n // b) + every)
    starts = [s for s in steps if any(s * b <= e * n < (s + 1) * b for e in range(1, s + 2))]
    due = range(every, steps.stop, every)
    want = sorted({min((s for s in starts if s >= d), default=-1) for d in due} - {-1})
    assert [s for s in steps if order.is_refresh_step(s)] == want


@settings(max_examples=25)
@given(case=sampler_cases(), seed=st.integers(0, 2**16), data=st.data())
def test_exact_resume_from_state(case, seed, data):
    n, b, c, refreshes = case
    total = -(-4 * n // b)
    stop = data.draw(st.integers(0, total), label="checkpoint step")
    refreshes = (*refreshes, data.draw(st.integers(stop, total + 1), label="later refresh"))
    refreshes = tuple(sorted(refreshes))
    want, _ = run_loop(HardBatchOrder(n, b, c, seed), range(total), refreshes, seed)
    order = HardBatchOrder(n, b, c, seed)
    run_loop(order, range(stop), refreshes, seed)  # train up to the checkpoint...
    state = order.state()
    assert len(state["refresh_steps"]) <= 2 and state["group_ids"].shape[1:] == (n,)
    resumed = HardBatchOrder.from_state(state)  # ...and restart from what was saved
    # The loop goes on, refreshing at steps >= stop with the same group ids as before.
    got, _ = run_loop(resumed, range(stop, total), refreshes, seed)
    for s, batch in zip(range(stop, total), got, strict=True):
        np.testing.assert_array_equal(batch, want[s])


def test_old_clusterings_are_dropped_and_their_steps_refused():
    # Epochs start at positions 0, 44, 88, 132: in steps 5, 11, 16 (batch 8).
    order = HardBatchOrder(44, 8, 4, seed=0)
    assert [s for s in range(20) if order.is_refresh_step(s)] == [5, 11, 16]
    for r in (5, 11, 16):
        order.set_clustering(random_groups(44, 4, r), refresh_step=r)
    # Step 16 (positions 128..135) still draws from epoch 2, which uses the step-11 clustering;
    # the step-5 one (epoch 1) was dropped at the step-11 refresh: steps < 11 are refused.
    state = order.state()
    assert state["refresh_steps"].tolist() == [11, 16] and state["first_step"] == 11
    assert state["group_ids"].shape == (2, 44)
    with pytest.raises(ValueError, match="precedes step 11"):
        order.batch_indices(10)
    resumed = HardBatchOrder.from_state(state)
    for s in range(11, 40):
        np.testing.assert_array_equal(resumed.batch_indices(s), order.batch_indices(s))
    with pytest.raises(ValueError, match="precedes step 11"):
        resumed.epoch_order(1)


def test_bad_input_is_one_line_value_error():
    order = HardBatchOrder(20, 8, 4, seed=0)
    cases = [
        (lambda: HardBatchOrder(20, 8, 16, seed=0), "cluster_size 16 exceeds batch_size 8"),
        (lambda: HardBatchOrder(20, 8, 3, seed=0), "not a multiple of cluster_size 3"),
        (lambda: HardBatchOrder(6, 8, 4, seed=0), "batch_size <= 6"),
        (lambda: HardBatchOrder(20, 8, 4, seed=0, refresh_every=0), "refresh_every"),
        (lambda: HardBatchOrder(20, 8, 0, seed=0), "cluster_size must be"),
        (lambda: HardBatchOrder(20, 8, 4, seed=-1), "seed must be"),
        (lambda: order.set_clustering(np.zeros(19, int), 0), r"int\[20\]"),
        (lambda: order.set_clustering(np.arange(20) // 2, 0), r"lie in \[0, 5\)"),
        (lambda: order.set_clustering(np.r_[np.zeros(5), np.ones(3)].repeat(1), 0), "int"),
        (lambda: order.set_clustering(np.arange(20) % 4, 0), "exactly 4 examples"),
        (lambda: order.host_rows(0, 0, 3), "not divisible by 3"),
        (lambda: order.host_rows(0, 2, 2), "out of range"),
        (lambda: order.batch_indices(-1), "step must be"),
        (lambda: hard_negative_count(np.array([0.5])), "int"),
        (lambda: hard_negative_count(np.array([NUM_CAPTIONS])), "caption ids"),
        (lambda: nearest_negative_rank(np.eye(3), np.array([0])), "B >= 2"),
        (lambda: nearest_negative_rank(np.eye(3), np.array([0, 0])), "distinct"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)
    order.set_clustering(np.arange(20) // 4, refresh_step=3)
    with pytest.raises(ValueError, match="refreshes must come in step order"):
        order.set_clustering(np.arange(20) // 4, refresh_step=2)


# ---------------------------------------------------------------------- metrics


def brute_force_one_apart(ids: np.ndarray) -> np.ndarray:
    a = np.stack(list(caption_attributes(ids).values()), axis=1)  # (B, 5)
    d = (a[:, None, :] != a[None, :, :]).sum(-1)  # (B, B) attribute distance
    return (d == 1).sum(1)


@settings(max_examples=40)
@given(
    ids=st.lists(st.integers(0, NUM_CAPTIONS - 1), min_size=1, max_size=60)
    | st.lists(st.integers(0, 40), min_size=1, max_size=60)  # many near neighbours
)
def test_hard_negative_count_matches_brute_force(ids):
    ids = np.array(ids)
    got = hard_negative_count(ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, brute_force_one_apart(ids))


def brute_force_rank(e: np.ndarray, batch: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    s = e[batch] @ e.T  # (B, D) · (D, N) -> (B, N)
    inside = s[:, batch].copy()
    np.fill_diagonal(inside, -np.inf)
    hardest = batch[inside.argmax(1)]
    thr = s[np.arange(len(batch)), hardest]
    others = np.ones_like(s, bool)
    others[np.arange(len(batch)), batch] = False
    others[np.arange(len(batch)), hardest] = False
    return 1 + ((s > thr[:, None]) & others).sum(1)


@settings(max_examples=20)
@given(
    n=st.sampled_from([5, 33, 64]),
    b=st.integers(2, 5),
    chunk=st.sampled_from([1, 7, 64]),
    seed=st.integers(0, 2**16),
)
def test_nearest_negative_rank_matches_brute_force(n, b, chunk, seed):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, 4)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    batch = rng.choice(n, size=b, replace=False)
    got = nearest_negative_rank(e, batch, chunk_size=chunk)
    np.testing.assert_array_equal(got, brute_force_rank(e, batch))
    assert got.min() >= 1 and got.max() <= n - 1


def test_shapes_hard_batches_have_far_more_one_attribute_neighbours():
    """Clusters of caption-attribute one-hot vectors make batches of near-identical captions.

    Measured (N = 4096 train examples, B = 256, c = 32, 16 steps = one epoch): hard batches
    7.8 one-attribute-apart batch-mates per anchor; random batches 1.36 (batch to batch
    standard deviation 0.10), against the expected (B - 1) / 189 = 1.35. The mean of 16
    random batches is thus 1.35 ± 0.03, so ``4 ×`` random is at most 5.9 even 5 standard
    deviations high, well below the measured 7.8; and a random-batch mean outside
    [1.1, 1.6] (8 standard deviations) would mean the metric is wrong.
    """
    n, b, c = 4096, 256, 32
    src = CaptionedShapes("train", num_examples=n)
    ids = np.array([caption_id(*(src.attributes(i)[0][k] for k in ATTRIBUTES)) for i in range(n)])
    attrs = caption_attributes(ids)
    # One-hot per attribute, 31 dims; cosine similarity (5 - d) / 5 for d attributes apart.
    onehot = np.concatenate(
        [np.eye(len(v), dtype=np.float32)[attrs[k]] for k, v in ATTRIBUTES.items()], axis=1
    )
    groups = balanced_clusters(onehot, cluster_size=c, iterations=10, key=jax.random.key(0))
    hard, rand = HardBatchOrder(n, b, c, seed=0), HardBatchOrder(n, b, c, seed=0)
    hard.set_clustering(np.asarray(groups), refresh_step=0)
    steps = range(n // b)
    hard_mean = np.mean([hard_negative_count(ids[hard.batch_indices(s)]).mean() for s in steps])
    rand_mean = np.mean([hard_negative_count(ids[rand.batch_indices(s)]).mean() for s in steps])
    expected = expected_neighbours(b, 1)
    assert 1.1 < rand_mean < 1.6 and abs(expected - 255 / 189) < 1e-9
    assert hard_mean > 4 * max(rand_mean, expected), (hard_mean, rand_mean)
