"""Retrieval-shaped batches: extra negatives, ``valid`` and ``ids``, against the float64 oracle.

On one device and on rings of 2, 4 and 8 simulated devices (``check_vma`` on and off),
with block sizes that do and do not divide the local blocks, ``valid`` patterns that
include an all-invalid batch and a single valid pair, and ``ids`` with many duplicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import losses
from tests.loss_cases import (
    CASES,
    LOSSES,
    assert_close,
    assert_hyper_grads_close,
    assert_mix,
    block_sizes,
    case_id,
    check_against_dense,
    embeddings,
    hyper,
    options,
    oracle,
    record,
    summed_terms,
    temperatures,
)
from tests.test_losses_ring import data_mesh

MiB = 2**20


def retrieval_batch(seed: int, batch: int, extra: int, dim: int):
    """x (B, D) and y (B + extra, D): y[:B] noisy copies of x, the rest other embeddings."""
    x, y = embeddings(seed, batch + extra, dim)
    return x[:batch], y


def mask_vectors(seed: int, rows: int, pattern: str, id_range: int | None):
    """valid ((rows,) bool or None) by pattern, and ids ((rows,) int32 or None) drawn from
    ``id_range`` values (few values: many duplicates)."""
    rng = np.random.default_rng(seed)
    valid = {
        "none": None,
        "random": rng.random(rows) < 0.7,
        "all invalid": np.zeros(rows, bool),
        "one valid": np.arange(rows) == rng.integers(rows),
    }[pattern]
    ids = None if id_range is None else rng.integers(0, id_range, rows).astype(np.int32)
    return (None if valid is None else jnp.asarray(valid)), (
        None if ids is None else jnp.asarray(ids)
    )


patterns = st.sampled_from(["none", "random", "all invalid", "one valid"])
id_ranges = st.one_of(st.none(), st.integers(1, 6))


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_masked_batches_match_dense(name):
    """Drawn extra negatives, ``valid`` patterns, ``ids`` and tilings against the oracle."""
    drawn = []

    @settings(max_examples=5, deadline=None)
    @given(
        opts=options(name),
        batch=st.integers(1, 40),
        extra=st.integers(0, 50),
        dim=st.integers(1, 24),
        data=st.data(),
        pattern=patterns,
        id_range=id_ranges,
        temperature=temperatures,
        seed=st.integers(0, 2**16),
    )
    def check(opts, batch, extra, dim, data, pattern, id_range, temperature, seed):
        if opts.get("intra_view"):
            extra = 0
        if name == "decoupled" and batch + extra < 2:
            batch = 2
        block = data.draw(block_sizes(batch), label="block_size")
        record(drawn, batch, block, valid=pattern)
        x, y = retrieval_batch(seed, batch, extra, dim)
        valid, ids = mask_vectors(seed, batch + extra, pattern, id_range)
        masked = {**opts, "valid": valid, "ids": ids}
        check_against_dense(name, masked, x, y, hyper(name, temperature, -2.0), block_size=block)

    check()
    assert_mix(drawn, tiles=("several", 0.2))


def ring_value_and_grads(name, opts, x, y, hp, *, n, check_vma, block):
    """Value and (dx, dy, dhyper) of the ring loss on ``n`` devices, grad outside."""
    mesh = data_mesh(n)
    f = getattr(losses, name)
    per_row = {k: opts.pop(k) for k in ("valid", "ids") if opts.get(k) is not None}
    opts = {k: v for k, v in opts.items() if k not in ("valid", "ids")}

    def local(x, y, hp, per_row):
        return f(x, y, **hp, **opts, **per_row, block_size=block, axis_name="data")

    sm = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    return jax.jit(jax.value_and_grad(sm, argnums=(0, 1, 2)))(x, y, hp, per_row)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_ring_masked_batches_match_dense(name):
    """The same on rings of 1, 2, 4 and 8 devices, y in the ring's interleaved layout."""
    drawn = []

    @settings(max_examples=4, deadline=None)
    @given(
        opts=options(name),
        n=st.sampled_from([1, 2, 4, 8]),
        local_batch=st.integers(1, 6),
        local_extra=st.integers(0, 7),
        dim=st.integers(1, 16),
        data=st.data(),
        pattern=patterns,
        id_range=id_ranges,
        temperature=temperatures,
        seed=st.integers(0, 2**16),
        check_vma=st.booleans(),
    )
    def check(
        opts, n, local_batch, local_extra, dim, data, pattern, id_range, temperature, seed,
        check_vma,
    ):  # fmt: skip
        if opts.get("intra_view"):
            local_extra = 0
        if name == "decoupled" and n * (local_batch + local_extra) < 2:
            local_batch = 2
        block = data.draw(block_sizes(local_batch), label="block_size")
        record(drawn, local_batch, block, devices="several" if n > 1 else "one", valid=pattern)
        check_ring_masked(
            name, opts, n, local_batch, local_extra, dim, block, pattern, id_range, temperature,
            seed, check_vma,
        )  # fmt: skip

    check()
    assert_mix(drawn, devices=("several", 0.25))


def check_ring_masked(
    name, opts, n, local_batch, local_extra, dim, block, pattern, id_range, temperature, seed,
    check_vma,
):  # fmt: skip
    batch, extra = n * local_batch, n * local_extra
    # The oracle's layout: y = [positives; extra negatives]; the ring's: interleaved.
    x, y = retrieval_batch(seed, batch, extra, dim)
    valid, ids = mask_vectors(seed, batch + extra, pattern, id_range)
    ring_layout = lambda a: None if a is None else losses.interleave(a[:batch], a[batch:], n)
    hp = hyper(name, temperature, -2.0)
    got = ring_value_and_grads(
        name,
        {**opts, "valid": ring_layout(valid), "ids": ring_layout(ids)},
        x,
        ring_layout(y),
        hp,
        n=n,
        check_vma=check_vma,
        block=block,
    )
    masked = {**opts, "valid": valid, "ids": ids}
    want_v, (want_dx, want_dy, want_dh) = oracle(name, masked, x, y, hp)
    what = f"{name}{opts} n={n} {pattern} ids<{id_range} vma={check_vma}"
    assert_close(got[0], want_v, rtol=1e-5, what=what + " value")
    assert_close(got[1][:2], (want_dx, ring_layout(want_dy)), rtol=1e-4, what=what + " dx, dy")
    terms = summed_terms(x, y, hp, want_dx, want_dy, valid, ids)
    assert_hyper_grads_close(got[1][2], want_dh, terms, what=what)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_option_with_hard_negatives_padding_and_duplicates(case):
    name, opts = case
    extra = 0 if opts.get("intra_view") else 9
    x, y = retrieval_batch(3, 13, extra, 10)
    valid, ids = mask_vectors(3, 13 + extra, "random", 4)
    opts = {**opts, "valid": valid, "ids": ids}
    check_against_dense(name, opts, x, y, hyper(name, 0.1, -3.0), block_size=5)


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
def test_invalid_rows_may_hold_anything(name):
    """NaN or huge values in invalid rows change nothing, and get zero gradients."""
    x, y = retrieval_batch(4, 12, 6, 8)
    valid = jnp.arange(18) % 5 != 3
    garbage = jnp.where(jnp.arange(18)[:, None] % 2, jnp.nan, 1e30)
    xg = jnp.where(valid[:12, None], x, garbage[:12])
    yg = jnp.where(valid[:, None], y, garbage)
    f = getattr(losses, name)
    vg = lambda x, y: jax.value_and_grad(lambda x, y: f(x, y, valid=valid, block_size=4), (0, 1))(
        x, y
    )
    got, want = jax.jit(vg)(xg, yg), jax.jit(vg)(x, y)
    assert_close(got, want, rtol=1e-6, what=name)
    assert not jnp.any(got[1][0][~valid[:12]]) and not jnp.any(got[1][1][~valid])


def test_interleave_and_the_sharded_wrapper():
    """losses.sharded on the interleaved global y equals the oracle on [positives; negatives]."""
    n = 4
    mesh = data_mesh(n)
    x, y = retrieval_batch(6, 16, 24, 8)
    valid, ids = mask_vectors(6, 40, "random", 5)
    layout = lambda a: losses.interleave(a[:16], a[16:], n)
    assert layout(jnp.arange(40)).tolist()[:10] == [0, 1, 2, 3, 16, 17, 18, 19, 20, 21]
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    for name in ["infonce", "sigmoid", "decoupled"]:
        hp = hyper(name, 0.2, -2.0)
        loss = losses.sharded(getattr(losses, name), mesh, "data")
        got = jax.jit(
            jax.value_and_grad(
                lambda x, y, hp, v, i, loss=loss: loss(x, y, **hp, valid=v, ids=i), argnums=(0, 1)
            )
        )(shard(x), shard(layout(y)), hp, shard(layout(valid)), shard(layout(ids)))
        want_v, (want_dx, want_dy, _) = oracle(name, {"valid": valid, "ids": ids}, x, y, hp)
        assert_close(got[0], want_v, rtol=1e-5, what=name)
        assert_close(got[1], (want_dx, layout(want_dy)), rtol=1e-4, what=name)
    # The all-gather baseline takes the same local layout.
    f = losses.gathered(losses.infonce, "data")
    sm = jax.shard_map(
        lambda x, y, v, i: f(x, y, valid=v, ids=i, temperature=0.2),
        mesh=mesh,
        in_specs=(P("data"),) * 4,
        out_specs=P(),
    )
    got = jax.jit(sm)(x, layout(y), layout(valid), layout(ids))
    want = oracle("infonce", {"valid": valid, "ids": ids}, x, y, hyper("infonce", 0.2))[0]
    assert_close(got, want, rtol=1e-5, what="gathered")
    with pytest.raises(ValueError, match="negatives has 6 rows, not a multiple of shards=4"):
        losses.interleave(y[:16], y[16:22], 4)


def _temp_bytes(fn, *specs) -> int:
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "case,masks",
    [
        (("infonce", {}), False),
        (("infonce", {}), True),
        (("sigmoid", {}), True),
        (("decoupled", {"sigma": 0.5}), True),
    ],
    ids=lambda c: case_id(c) if isinstance(c, tuple) else ("masks" if c else "plain"),
)
def test_memory_with_four_times_as_many_candidates(case, masks):
    """B = 65,536 anchors, M = 4B candidates, D = 256: no B x M buffer; the temporaries
    stay within the M = B bound (128 MiB, tests/test_losses_tiled.py) plus O(M)."""
    name, opts = case
    f = getattr(losses, name)
    b, m, d = 65536, 4 * 65536, 256
    sx = jax.ShapeDtypeStruct((b, d), jnp.float32)
    sy = jax.ShapeDtypeStruct((m, d), jnp.float32)
    sv = jax.ShapeDtypeStruct((m,), jnp.bool_)
    si = jax.ShapeDtypeStruct((m,), jnp.int32)
    if masks:
        fn = jax.value_and_grad(lambda x, y, v, i: f(x, y, valid=v, ids=i, **opts), argnums=(0, 1))
        temp = _temp_bytes(fn, sx, sy, sv, si)
    else:
        temp = _temp_bytes(jax.value_and_grad(lambda x, y: f(x, y, **opts), (0, 1)), sx, sy)
    bound = 128 * MiB + 64 * m  # O(M): a few float32 vectors of the candidates
    print(f"\n{case_id(case)} masks={masks}: {temp / MiB:.0f} MiB")
    assert temp <= bound, f"{temp / MiB:.0f} MiB > {bound / MiB:.0f} MiB"
