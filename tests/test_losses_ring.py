"""The ring losses on 1, 2, 4 and 8 simulated devices against the dense float64 oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
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
    embeddings,
    hyper,
    options,
    oracle,
    record,
    summed_terms,
    temperatures,
)

MiB = 2**20


def data_mesh(n: int, names=("data",), shape=None):
    shape = shape or (n,)
    return jax.make_mesh(
        shape, names, axis_types=(AxisType.Auto,) * len(names), devices=jax.devices()[:n]
    )


def ring_value_and_grads(name, opts, x, y, hp, *, mesh, axis, check_vma, inside, block):
    """Value and (dx, dy, dhyper) of the ring loss, with grad taken outside or inside."""
    f = getattr(losses, name)
    local = lambda x, y, hp: f(x, y, **hp, **opts, block_size=block, axis_name=axis)
    spec = P(axis)
    if inside:  # jax.grad inside shard_map: the local shards' gradients are global ones
        fn = lambda x, y, hp: jax.value_and_grad(local, argnums=(0, 1, 2))(x, y, hp)
        out_specs = (P(), (spec, spec, P()))
        return jax.jit(
            jax.shard_map(
                fn,
                mesh=mesh,
                in_specs=(spec, spec, P()),
                out_specs=out_specs,
                check_vma=check_vma,
            )
        )(x, y, hp)
    sm = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P(), check_vma=check_vma
    )
    return jax.jit(jax.value_and_grad(sm, argnums=(0, 1, 2)))(x, y, hp)


def check_ring(name, opts, n, local_batch, dim, block, temperature, seed, check_vma, inside):
    mesh = data_mesh(n)
    x, y = embeddings(seed, n * local_batch, dim)
    hp = hyper(name, temperature)
    got = ring_value_and_grads(
        name,
        opts,
        x,
        y,
        hp,
        mesh=mesh,
        axis="data",
        check_vma=check_vma,
        inside=inside,
        block=block,
    )
    want = oracle(name, opts, x, y, hp)
    what = f"{name}{opts} n={n} vma={check_vma} inside={inside}"
    assert_close(got[0], want[0], rtol=1e-5, what=what + " value")
    assert_close(got[1][:2], want[1][:2], rtol=1e-4, what=what + " dx, dy")
    terms = summed_terms(x, y, hp, want[1][0], want[1][1])
    assert_hyper_grads_close(got[1][2], want[1][2], terms, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_ring_matches_dense(name):
    """Drawn options, ring sizes, local batches, tilings of each device's block and
    hyperparameters against the float64 oracle; the mix is checked at the end."""
    drawn = []

    @settings(max_examples=12, deadline=None)
    @given(
        opts=options(name),
        n=st.sampled_from([1, 2, 4, 8]),
        local_batch=st.integers(3, 24),
        dim=st.integers(1, 48),
        data=st.data(),
        temperature=temperatures,
        seed=st.integers(0, 2**16),
        check_vma=st.booleans(),
    )
    def check(opts, n, local_batch, dim, data, temperature, seed, check_vma):
        block = data.draw(block_sizes(local_batch), label="block_size")
        record(drawn, local_batch, block, devices="several" if n > 1 else "one")
        check_ring(name, opts, n, local_batch, dim, block, temperature, seed, check_vma, False)

    check()
    assert_mix(drawn, layout=("ragged", 0.2), devices=("several", 0.25))


# The three ways a user takes gradients: outside shard_map with and without check_vma,
# and inside it (check_vma on). Each (loss, option) meets each ring size once, and the
# way rotates with the ring size, so every option is checked in every way.
WAYS = [(True, False), (False, False), (True, True)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_every_option_on_every_ring_size(case, n):
    name, opts = case
    k = [1, 2, 4, 8].index(n) + CASES.index(case)
    check_vma, inside = WAYS[k % len(WAYS)]
    check_ring(name, opts, n, 5, 12, 2, 0.2, n, check_vma, inside)


def test_tuple_axis_on_a_2d_mesh():
    mesh = data_mesh(8, names=("replica", "data"), shape=(2, 4))
    x, y = embeddings(0, 8 * 3, 6)
    for name, opts in [("infonce", {"intra_view": True}), ("sigmoid", {})]:
        hp = hyper(name, 0.3)
        got = ring_value_and_grads(
            name,
            opts,
            x,
            y,
            hp,
            mesh=mesh,
            axis=("replica", "data"),
            check_vma=True,
            inside=False,
            block=None,
        )
        want = oracle(name, opts, x, y, hp)
        assert_close(got[0], want[0], rtol=1e-5, what=name)
        assert_close(got[1][:2], want[1][:2], rtol=1e-4, what=name)


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "decoupled"])
def test_sharded_wrapper_from_plain_jit(name):
    mesh = data_mesh(8)
    x, y = embeddings(1, 64, 16)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    hp = hyper(name, 0.1)
    loss = losses.sharded(getattr(losses, name), mesh, "data")
    got = jax.jit(jax.value_and_grad(lambda x, y, hp: loss(x, y, **hp), argnums=(0, 1, 2)))(
        xs, ys, hp
    )
    want = oracle(name, {}, x, y, hp)
    assert_close(got[0], want[0], rtol=1e-5, what=name)
    assert_close(got[1][:2], want[1][:2], rtol=1e-4, what=name)
    assert got[1][0].sharding.is_equivalent_to(xs.sharding, 2)


def test_gathered_baseline_matches_dense():
    mesh = data_mesh(4)
    x, y = embeddings(2, 32, 8)
    hp = hyper("infonce", 0.1)
    f = losses.gathered(losses.infonce, "data")
    sm = jax.shard_map(
        lambda x, y, hp: f(x, y, **hp),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=P(),
    )
    got = jax.jit(jax.value_and_grad(sm, argnums=(0, 1, 2)))(x, y, hp)
    want = oracle("infonce", {}, x, y, hp)
    assert_close(got[0], want[0], rtol=1e-5, what="gathered")
    assert_close(got[1][:2], want[1][:2], rtol=1e-4, what="gathered")


def test_errors():
    mesh = data_mesh(4)
    x, y = embeddings(0, 10, 4)
    with pytest.raises(ValueError, match=r"does not split into 4 equal shards.*multiple of 4"):
        losses.sharded(losses.infonce, mesh, "data")(x, y)
    with pytest.raises(ValueError, match=r"'batch' is not in the mesh.*\('data',\)"):
        losses.sharded(losses.infonce, mesh, "batch")
    with pytest.raises(ValueError, match="not a mesh axis"):
        jax.shard_map(
            lambda x, y: losses.infonce(x, y, axis_name="batch"),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
        )(x[:8], y[:8])
    one = data_mesh(1)
    with pytest.raises(ValueError, match="global batch of at least 2 pairs, got 1"):
        losses.sharded(losses.decoupled, one, "data")(x[:1], y[:1])


def _ring_temp(name, opts, *, batch, dim, n, gathered=False):
    mesh = data_mesh(n)
    f = getattr(losses, name)
    if gathered:
        f = losses.gathered(f, "data")
    sm = jax.shard_map(
        lambda x, y: f(x, y, **opts, **({} if gathered else {"axis_name": "data"})),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(jax.value_and_grad(sm, argnums=(0, 1))).lower(spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "case",
    [
        ("infonce", {}),
        ("sigmoid", {}),
        ("decoupled", {"sigma": 0.5}),
        ("infonce", {"intra_view": True}),
        ("decoupled", {"intra_view": True}),
    ],
    ids=case_id,
)
def test_memory_at_a_million_pairs_on_8_devices(case):
    """B = 1,048,576, D = 768 float32 on 8 devices: a local shard of x is 384 MiB."""
    name, opts = case
    batch, dim, n = 1 << 20, 768, 8
    shard = batch // n * dim * 4
    temp = _ring_temp(name, opts, batch=batch, dim=dim, n=n)
    shards = 6 if opts.get("intra_view") else 4
    print(f"\n{case_id(case)}: ring {temp / MiB:.0f} MiB per device ({temp / shard:.2f} shards)")
    assert temp <= shards * shard + 64 * MiB, f"{temp / MiB:.0f} MiB"


def test_all_gather_baseline_memory_is_larger():
    """The bound above is not trivial: gathering the batch needs several full copies."""
    batch, dim, n = 1 << 20, 768, 8
    ring = _ring_temp("infonce", {}, batch=batch, dim=dim, n=n)
    gathered = _ring_temp("infonce", {}, batch=batch, dim=dim, n=n, gathered=True)
    print(f"\nall-gather {gathered / MiB:.0f} MiB vs ring {ring / MiB:.0f} MiB per device")
    assert gathered >= 4 * ring
