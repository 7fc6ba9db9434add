"""Chunked spherical k-means and the balanced partition (contrastive.inputs.clustering).

Truth is a NumPy float64 Lloyd iteration written out below, started from the same indices;
chunking must not change any result; memory is checked by compiling at N = 1M, k = 4096.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.inputs.clustering import (
    assign,
    balanced_clusters,
    initial_indices,
    kmeans,
    kmeans_step,
)

SEEDS = st.integers(0, 2**31 - 1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_step(points: np.ndarray, centroids: np.ndarray):
    """One spherical Lloyd iteration in float64: the reference for ``kmeans_step``."""
    x, mu = _unit(points), _unit(centroids)
    k = len(mu)
    s = x @ mu.T  # (N, D) · (D, k) -> (N, k), dense: fine at test sizes
    a = s.argmax(axis=1)
    best = s[np.arange(len(x)), a]
    sums = np.zeros_like(mu)
    np.add.at(sums, a, x)
    counts = np.bincount(a, minlength=k)
    worst = np.argsort(best, kind="stable")[:k]  # least well served first, ties by index
    new = _unit(sums)
    empty = np.flatnonzero(counts == 0)
    new[empty] = x[worst[: len(empty)]]
    return new, a, best


def np_kmeans(points: np.ndarray, init: np.ndarray, iterations: int):
    mu = _unit(points)[init]
    for _ in range(iterations):
        mu, _, _ = np_step(points, mu)
    _, a, _ = np_step(points, mu)
    return mu, a


def blobs(seed: int, n: int, dim: int, centres: int, noise: float = 0.3) -> np.ndarray:
    """``n`` points around ``centres`` random directions: clusters to find, few near-ties."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, dim))
    return (mu[rng.integers(centres, size=n)] + noise * rng.normal(size=(n, dim))).astype(
        np.float32
    )


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_matches_numpy_reference(seed):
    n, dim, k, iterations = 300, 6, 7, 6
    x = blobs(seed, n, dim, centres=5, noise=0.6)
    key = jax.random.key(seed)
    centroids, a = kmeans(x, num_clusters=k, iterations=iterations, key=key, chunk_size=64)
    ref_mu, ref_a = np_kmeans(x, np.asarray(initial_indices(key, n, k)), iterations)
    np.testing.assert_array_equal(np.asarray(a), ref_a)
    np.testing.assert_allclose(np.asarray(centroids), ref_mu, rtol=0, atol=1e-5)
    assert a.dtype == jnp.int32 and centroids.shape == (k, dim)


def test_initial_centroids_are_distinct_points():
    idx = np.asarray(initial_indices(jax.random.key(3), 50, 50))
    assert sorted(idx.tolist()) == list(range(50))
    x = blobs(0, 50, 4, 3)
    centroids, _ = kmeans(x, num_clusters=9, iterations=0, key=jax.random.key(3))
    np.testing.assert_allclose(
        np.asarray(centroids),
        _unit(x)[np.asarray(initial_indices(jax.random.key(3), 50, 9))],
        atol=1e-6,
    )


def test_empty_cluster_is_reseeded_with_the_worst_served_points():
    # Points in the positive orthant; centroids 1 and 3 point away from all of them, so both
    # clusters are empty and take the two points least similar to their own centroid.
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(40, 5))).astype(np.float32)
    mu = np.abs(rng.normal(size=(4, 5))).astype(np.float32)
    mu[1], mu[3] = -mu[1], -mu[3]
    new, a, best = kmeans_step(x, mu, chunk_size=16)
    ref_new, ref_a, ref_best = np_step(x, mu)
    assert set(np.asarray(a).tolist()) <= {0, 2}
    np.testing.assert_array_equal(np.asarray(a), ref_a)
    np.testing.assert_allclose(np.asarray(best), ref_best, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new), ref_new, atol=1e-6)
    worst = np.argsort(ref_best, kind="stable")[:2]
    np.testing.assert_allclose(np.asarray(new)[[1, 3]], _unit(x)[worst], atol=1e-6)


# Shapes from small sets (each new shape compiles); the data vary freely.
@pytest.mark.slow  # a hypothesis sweep
@settings(max_examples=20)
@given(
    n=st.sampled_from([1, 37, 64]),
    k=st.sampled_from([1, 5, 12]),
    chunk=st.sampled_from([1, 7, 16, 37, 64, 100]),
    dim=st.sampled_from([1, 8]),
    seed=SEEDS,
)
def test_chunked_assignment_equals_unchunked(n, k, chunk, dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    mu = rng.normal(size=(k, dim)).astype(np.float32)
    a, s = assign(x, mu, chunk_size=chunk)
    a1, s1 = assign(x, mu, chunk_size=n)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a1))
    np.testing.assert_allclose(np.asarray(s), np.asarray(s1), rtol=0, atol=1e-6)
    ref = _unit(x) @ _unit(mu).T
    np.testing.assert_allclose(np.asarray(s), ref.max(axis=1), atol=1e-5)
    # The chosen centroid is a maximiser (exact ties, e.g. dim = 1, may pick either).
    np.testing.assert_allclose(ref[np.arange(n), np.asarray(a)], ref.max(axis=1), atol=1e-5)
    if k <= n:  # the sums too: a step's centroids do not depend on the chunking
        new, _, _ = kmeans_step(x, mu, chunk_size=chunk)
        new1, _, _ = kmeans_step(x, mu, chunk_size=n)
        np.testing.assert_allclose(np.asarray(new), np.asarray(new1), rtol=0, atol=1e-5)


@settings(max_examples=8)
@given(n=st.sampled_from([40, 96]), chunk=st.sampled_from([7, 16, 40, 1000]), seed=SEEDS)
def test_kmeans_does_not_depend_on_chunk_size(n, chunk, seed):
    x = blobs(seed, n, 5, centres=4)
    key = jax.random.key(seed)
    c1, a1 = kmeans(x, num_clusters=4, iterations=4, key=key, chunk_size=chunk)
    c2, a2 = kmeans(x, num_clusters=4, iterations=4, key=key, chunk_size=n)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_allclose(np.asarray(c1), np.asarray(c2), rtol=0, atol=1e-5)


def test_kmeans_is_deterministic_given_the_key():
    x = blobs(1, 200, 8, centres=6)
    run = lambda s: kmeans(x, num_clusters=6, iterations=3, key=jax.random.key(s), chunk_size=50)
    (c1, a1), (c2, a2), (c3, _) = run(0), run(0), run(1)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    assert not np.array_equal(np.asarray(c1), np.asarray(c3))


@settings(max_examples=12)
@given(n=st.sampled_from([1, 17, 64, 150]), size=st.sampled_from([1, 3, 16, 40]), seed=SEEDS)
def test_balanced_groups_have_exactly_cluster_size_members(n, size, seed):
    size = min(size, n)
    x = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    key = jax.random.key(seed)
    g = np.asarray(balanced_clusters(x, cluster_size=size, iterations=2, key=key))
    groups = -(-n // size)
    assert g.dtype == np.int32 and g.min() == 0 and g.max() == groups - 1
    counts = np.bincount(g, minlength=groups)
    assert (counts[:-1] == size).all() and counts[-1] == n - (groups - 1) * size


def test_balanced_groups_follow_the_kmeans_order():
    # Group g is sorted positions [g·c, (g+1)·c) of (cluster, decreasing similarity).
    x = blobs(2, 130, 6, centres=5)
    key, c = jax.random.key(5), 20
    g = np.asarray(balanced_clusters(x, cluster_size=c, iterations=3, key=key))
    centroids, a = kmeans(x, num_clusters=7, iterations=3, key=key)
    sim = (_unit(x) * np.asarray(centroids, np.float64)[np.asarray(a)]).sum(1)
    order = np.lexsort((-sim, np.asarray(a)))
    np.testing.assert_array_equal(g[order], np.arange(130) // c)


def test_balanced_groups_on_separated_blobs_are_pure():
    # 8 well separated blobs of exactly 25 points in 16 dimensions, groups of 25: k-means with
    # 8 clusters and reseeding finds them, so each group is one blob.
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:8]  # orthonormal directions
    label = np.repeat(np.arange(8), 25)
    x = (centres[label] + 0.05 * rng.normal(size=(200, 16))).astype(np.float32)
    perm = rng.permutation(200)
    x, label = x[perm], label[perm]
    g = np.asarray(balanced_clusters(x, cluster_size=25, iterations=10, key=jax.random.key(0)))
    purity = sum(np.bincount(label[g == j]).max() for j in range(8)) / 200
    assert purity == 1.0


def test_bad_input_is_one_line_value_error():
    x = jnp.zeros((10, 3))
    key = jax.random.key(0)
    cases = [
        (lambda: kmeans(x, num_clusters=11, iterations=1, key=key), "num_clusters <= 10"),
        (lambda: kmeans(x, num_clusters=0, iterations=1, key=key), "num_clusters must be"),
        (lambda: kmeans(x, num_clusters=2, iterations=-1, key=key), "iterations must be"),
        (lambda: kmeans(x, num_clusters=2, iterations=1, key=key, chunk_size=0), "chunk_size"),
        (lambda: kmeans(x[0], num_clusters=2, iterations=1, key=key), r"\[N, D\]"),
        (lambda: kmeans(x.astype(jnp.int32), num_clusters=2, iterations=1, key=key), "floating"),
        (lambda: balanced_clusters(x, cluster_size=11, iterations=1, key=key), "<= 10"),
        (lambda: assign(x, jnp.zeros((2, 4))), "dimension 4"),
        (lambda: kmeans_step(x, jnp.zeros((11, 3))), "at most 10 clusters"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)


# At N = 1M, D = 256, k = 4096 the N×k similarity matrix alone would be 16 GiB. Temporaries
# allowed (float32/int32, 4 bytes each): the chunk's similarity block and its one-hot
# membership (2·c·k), the segment sums, the new and re-seeded centroids (3·k·D), the
# normalised chunk and a copy (2·c·D), and per point the assignment, the similarity, top_k's
# and the sort's buffers (8·N). Measured (jax 0.10.2, CPU): 144 MiB for k-means at c = 4096
# against this bound's 180 MiB, and 16 GiB for N·k.
N, D, K = 1_048_576, 256, 4096


def _bound(chunk: int) -> int:
    return 4 * (2 * chunk * K + 3 * K * D + 2 * chunk * D + 8 * N)


def _temp(fn, *specs) -> int:
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("chunk", [1024, 4096])
def test_compiled_memory_is_far_below_n_by_k(chunk):
    points = jax.ShapeDtypeStruct((N, D), jnp.float32)
    centroids = jax.ShapeDtypeStruct((K, D), jnp.float32)
    key = jax.random.key(0)
    temps = {
        "assign": _temp(functools.partial(assign, chunk_size=chunk), points, centroids),
        "step": _temp(functools.partial(kmeans_step, chunk_size=chunk), points, centroids),
        "kmeans": _temp(
            lambda x: kmeans(x, num_clusters=K, iterations=5, key=key, chunk_size=chunk), points
        ),
        "balanced": _temp(
            lambda x: balanced_clusters(
                x, cluster_size=N // K, iterations=5, key=key, chunk_size=chunk
            ),
            points,
        ),
    }
    for name, temp in temps.items():
        assert 0 < temp <= _bound(chunk), (name, temp, _bound(chunk))
        assert temp * 50 < N * K * 4, (name, temp)


def test_benchmark_runs_at_a_toy_size(tmp_path, capsys):
    import json

    from experiments import bench_clustering

    argv = ["--points", "300", "--dim", "8", "--cluster-size", "16", "--iterations", "2"]
    assert bench_clustering.main([*argv, "--chunk-size", "64", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_clustering.json").read_text())["result"]
    assert result["clusters"] == 19 and result["group_sizes_ok"]
    assert result["iteration_s"] > 0 and result["total_s"] > 0
    assert result["step_temp_bytes"] > 0 and result["balanced_temp_bytes"] > 0
    bound = result["temp_bound_bytes"]  # the formula of _bound, at the benchmark's sizes
    assert bound == 4 * (2 * 64 * 19 + 3 * 19 * 8 + 2 * 64 * 8 + 8 * 300)
    assert result["step_temp_bytes"] <= bound and result["balanced_temp_bytes"] <= bound
    assert str(tmp_path / "bench_clustering.json") in capsys.readouterr().out
    assert bench_clustering.main(["--points", "10", "--cluster-size", "11"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cluster-size 11 exceeds") and err.count("\n") == 1
