"""Per-anchor precision where the positive dominates: each anchor's loss against float64.

A loss is a mean over anchors, and a mean hides an anchor whose tiny loss lost its digits:
the large losses dominate it. These tests compare the engine's per-anchor losses one by one
(tiled, and around rings of 2, 4 and 8 devices) on batches where most anchors' losses are
far below 1e-3.

The embeddings are built so that every product ``x·y`` is exact in float32 (entries are
multiples of 1/64, few enough that every dot product fits in 24 bits): the products carry
no rounding of their own, and what is left is the rounding of the loss's own arithmetic.
All rows share a common direction, so every logit is close to ``|c|² / τ`` (thousands)
while a positive beats its negatives by a small unscaled gap ``δ``: the regime where a
margin formed as a difference of two large logits, ``(s_max + log S) - s_pos``, keeps none
of the digits of ``s_max - s_pos``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from losses import _reference as reference
from losses._ring import anchor_losses
from losses._tiles import TileRule, choose_tiling
from tests.loss_cases import (
    assert_close,
    assert_hyper_grads_close,
    assert_mix,
    block_sizes,
    enable_x64,
    hyper,
    options,
    oracle,
    record,
    summed_terms,
)
from tests.test_losses_ring import data_mesh, ring_value_and_grads

U = 2.0**-24  # float32 unit roundoff
SOFTMAX_LOSSES = ("infonce", "decoupled")


def dominant_pairs(seed: int, batch: int, half_dim: int):
    """``x, y``: ``(batch, 2 * half_dim)`` float32 whose products are exact.

    The first ``half_dim`` features hold a shared direction ``c`` (entries 1/2, so
    ``|c|² = half_dim / 4``); the others each row's own small part ``a_i`` (entries
    ``k/64``, ``|k| <= 3``). ``y_i = x_i + e_i`` with a sparse ``±1/64`` change ``e_i``.
    Then ``x_i·y_j = |c|² + a_i·(a_j + e_j)``: the positive wins by ``|a_i|² - a_i·a_j``,
    a few hundredths, on logits of about ``|c|²``.
    """
    rng = np.random.default_rng(seed)
    c = np.full((batch, half_dim), 0.5)
    a = rng.integers(-3, 4, (batch, half_dim)) / 64
    e = rng.integers(-1, 2, (batch, half_dim)) * (rng.random((batch, half_dim)) < 0.2) / 64
    x = np.concatenate([c, a], axis=1)
    y = np.concatenate([c, a + e], axis=1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def temperature_for_margin(x, y, margin: float) -> float:
    """The float32 temperature at which the median anchor's positive beats its strongest
    negative by ``margin`` logits (its loss then about ``exp(-margin)``): far below 1e-3,
    yet clear of float32's underflow (1e-38), which no float32 loss can resolve."""
    s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    negatives = np.where(np.eye(len(s), dtype=bool), -np.inf, s)
    gap = np.median(np.diag(s) - negatives.max(axis=1))
    return float(np.float32(gap / margin))


def engine_per_anchor(name, opts, x, y, temperature, block, n):
    """The engine's per-anchor losses ``(rows (B,), cols (B,) or None)`` on ``n`` devices."""
    rule = TileRule(
        "logsumexp",
        columns=opts.get("symmetric", True),
        drop_positive=name == "decoupled",
        intra_view=opts.get("intra_view", False),
    )

    def local(x, y, axis_name):
        tiling = choose_tiling(x.shape[0], block)
        return anchor_losses(
            x, y, scale=1.0 / jnp.float32(temperature), bias=jnp.float32(0.0), weights=None,
            valid=None, ids=None, rule=rule, axis_name=axis_name, row_tiling=tiling,
            col_tiling=tiling,
        )  # fmt: skip

    if n == 1:
        return jax.jit(lambda x, y: local(x, y, None))(x, y)
    spec = P("data")
    fn = jax.shard_map(
        lambda x, y: local(x, y, "data"), mesh=data_mesh(n), in_specs=(spec, spec), out_specs=spec
    )
    return jax.jit(fn)(x, y)


def oracle_per_anchor(name, opts, x, y, temperature):
    """The dense per-anchor losses in float64 (exact products, float64 arithmetic)."""
    with enable_x64():
        x64, y64 = (jnp.asarray(np.asarray(a, np.float64)) for a in (x, y))
        rows, cols = reference._softmax_losses(
            x64,
            y64,
            jnp.float64(temperature),
            drop_positive=name == "decoupled",
            weights=jnp.ones(x.shape[0], jnp.float64),
            intra_view=opts.get("intra_view", False),
            valid=None,
            ids=None,
        )
        return np.asarray(rows), np.asarray(cols)


def assert_each_anchor_close(name: str, got, want, what: str) -> None:
    """Each anchor within a few roundings of its own loss's arithmetic.

    InfoNCE's ``ℓ = softplus(μ)`` with margin ``μ = (s_max - s_pos) + log S``: the exact
    products leave ``μ`` off by a few ulps of ``|μ|`` (the scaling, ``log S``), and
    ``|dℓ/dμ| <= ℓ``, so ``|Δℓ| <= 8u (1 + |μ|) ℓ``. DCL's ``ℓ = μ`` itself:
    ``|Δℓ| <= 8u (1 + |ℓ|)``.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if name == "infonce":
        margin = np.log(np.expm1(want))
        # Plus float32's smallest normal: a loss below it has no relative digits to keep.
        tol = 8 * U * (1 + np.abs(margin)) * want + np.finfo(np.float32).tiny
    else:
        tol = 8 * U * (1 + np.abs(want))
    err = np.abs(got - want)
    worst = int(np.argmax(err / tol))
    assert np.all(err <= tol), (
        f"{what}: anchor {worst} loss {got[worst]:.6e} vs float64 {want[worst]:.6e} "
        f"(error {err[worst] / abs(want[worst]):.1e} relative, {err[worst] / tol[worst]:.1f}x "
        f"the bound); {int(np.sum(err > tol))} of {err.size} anchors out"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_each_anchor_keeps_its_digits_where_the_positive_dominates(name):
    drawn = []

    @settings(max_examples=10, deadline=None)
    @given(
        opts=options(name, sigma=False),
        n=st.sampled_from([1, 2, 4, 8]),
        local_batch=st.integers(3, 24),
        half_dim=st.integers(8, 32),
        margin=st.floats(8.0, 40.0),
        data=st.data(),
        seed=st.integers(0, 2**16),
    )
    def check(opts, n, local_batch, half_dim, margin, data, seed):
        block = data.draw(block_sizes(local_batch), label="block_size")
        x, y = dominant_pairs(seed, n * local_batch, half_dim)
        temperature = temperature_for_margin(x, y, margin)
        rows, cols = engine_per_anchor(name, opts, x, y, temperature, block, n)
        want_rows, want_cols = oracle_per_anchor(name, opts, x, y, temperature)
        tiny = np.mean(np.abs(want_rows) < 1e-3) if name == "infonce" else 0.0
        record(
            drawn, local_batch, block, devices="several" if n > 1 else "one",
            tiny="most" if tiny >= 0.5 else "few",
        )  # fmt: skip
        what = f"{name}{opts} n={n} block={block} τ={temperature:.2e}"
        assert_each_anchor_close(name, rows, want_rows, what + " x anchors")
        if cols is not None:
            assert_each_anchor_close(name, cols, want_cols, what + " y anchors")

    check()
    assert_mix(drawn, layout=("ragged", 0.2), devices=("several", 0.25))
    if name == "infonce":  # the regime this test is for
        assert_mix(drawn, tiny=("most", 0.5))


@pytest.mark.slow
@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_gradients_at_large_logits_match_float64(name):
    """The same batches (logits in the thousands, exact products), tiled and ring: values
    and gradients against the float64 oracle at the usual tolerances. Both passes must
    evaluate the same ``exp(scale (x·y - m))``: formed as ``exp(scale x·y - scale m)``,
    every entry of ``G`` is off by an ulp of a logit.

    Not here: the sigmoid loss (its bias would have to be near -10⁴, and ``s + b`` then
    keeps no more digits than the float32 ``b`` itself) and DCLW (``w_i s_ii`` is as
    sensitive to the float32 rounding of the weights): conditioning, not the engine.
    """
    drawn = []

    @settings(max_examples=6, deadline=None)
    @given(
        opts=options(name, sigma=False),
        n=st.sampled_from([1, 2, 4, 8]),
        local_batch=st.integers(3, 16),
        half_dim=st.integers(8, 32),
        temperature=st.floats(2e-4, 1e-3),
        data=st.data(),
        seed=st.integers(0, 2**16),
    )
    def check(opts, n, local_batch, half_dim, temperature, data, seed):
        block = data.draw(block_sizes(local_batch), label="block_size")
        record(drawn, local_batch, block, devices="several" if n > 1 else "one")
        x, y = dominant_pairs(seed, n * local_batch, half_dim)
        hp = hyper(name, float(np.float32(temperature)))
        got = ring_value_and_grads(
            name, opts, x, y, hp, mesh=data_mesh(n), axis="data", check_vma=True,
            inside=False, block=block,
        )  # fmt: skip
        want = oracle(name, opts, x, y, hp)
        what = f"{name}{opts} n={n} block={block} τ={temperature:.2e}"
        assert_close(got[0], want[0], rtol=1e-5, what=what + " value")
        assert_close(got[1][:2], want[1][:2], rtol=1e-4, what=what + " dx, dy")
        terms = summed_terms(x, y, hp, want[1][0], want[1][1])
        assert_hyper_grads_close(got[1][2], want[1][2], terms, what=what)

    check()
    assert_mix(drawn, layout=("ragged", 0.2))
