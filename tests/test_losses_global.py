"""The global contrastive loss (SogCLR, iSogCLR) against its dense float64 reference.

Values, gradients (x, y, the temperature or per-anchor temperatures) and the updated
moving averages ``log u``: tiled on one device with ragged tiles, and around the ring on
1, 2, 4 and 8 simulated devices inside ``shard_map``; the reference itself against a
hand-computed case and against DCL; compiled memory at B = 65,536.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import losses
from losses import reference
from tests.loss_cases import (
    assert_close,
    assert_mix,
    block_sizes,
    embeddings,
    enable_x64,
    record,
    summed_terms,
    temperatures,
)

MiB = 2**20


# --- helpers ----------------------------------------------------------------------------------


def initial_state(seed: int, batch: int) -> jax.Array:
    """``log u`` for ``batch`` anchors: some ``-inf`` (never seen, u = 0), the rest spread
    over several orders of magnitude around a typical ``log ĝ``."""
    k1, k2 = jax.random.split(jax.random.key(seed + 7))
    log_u = 2.0 * jax.random.normal(k1, (batch,), jnp.float32)
    return jnp.where(jax.random.uniform(k2, (batch,)) < 0.3, -jnp.inf, log_u)


def temperature_args(t: float, batch: int, per_anchor: bool, seed: int) -> dict:
    """The differentiable temperature arguments: a scalar, or per-anchor ``τ_i`` for both
    directions spread around ``t`` (iSogCLR)."""
    if not per_anchor:
        return {"temperature": jnp.float32(t)}
    k1, k2 = jax.random.split(jax.random.key(seed + 11))
    spread = lambda k: jnp.float32(t) * jnp.exp(0.5 * jax.random.uniform(k, (batch,), minval=-1))
    return {"temperature": spread(k1), "temperature_y": spread(k2)}


def _fn(f, opts):
    """``(x, y, state, hp) -> (loss, new state)`` for ``jax.value_and_grad(has_aux=True)``."""

    def fn(x, y, state, hp):
        loss, new = f(x, y, *state, **hp, **opts)
        return loss, tuple(u for u in new if u is not None)

    return fn


def tiled(x, y, state, hp, opts, *, block):
    fn = _fn(losses.global_infonce, {**opts, "block_size": block})
    (v, new), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3), has_aux=True))(x, y, state, hp)
    return v, new, g


def oracle(x, y, state, hp, opts):
    """The dense reference in float64, as numpy arrays: ``(value, new state, grads)``."""
    with enable_x64():
        f64 = lambda a: None if a is None else np.asarray(a, np.float64)
        x64, y64 = f64(x), f64(y)
        st64 = tuple(f64(u) for u in state)
        hp64 = {k: f64(v) for k, v in hp.items()}
        fn = _fn(reference.global_infonce, opts)
        out = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3), has_aux=True))(x64, y64, st64, hp64)
        (v, new), g = jax.tree.map(np.asarray, out)
    return v, new, g


def assert_state_close(got, want, what: str) -> None:
    """``log u`` to 1e-5 absolute where it is O(1) (u to relative 1e-5), relative beyond;
    the same entries infinite (anchors that saw no negative keep ``u = 0``)."""
    for a, e in zip(got, want, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (what, a.shape, e.shape)
        assert np.array_equal(np.isinf(a), np.isinf(e)), f"{what}: infinite entries differ"
        fin = np.isfinite(e)
        if fin.any():
            scale = max(1.0, np.max(np.abs(e[fin])))
            err = np.max(np.abs(a[fin] - e[fin]))
            assert err <= 1e-5 * scale, f"{what}: log u error {err:.2e} (scale {scale:.1f})"


def assert_matches(got, want, x, y, hp, what: str) -> None:
    v, new, (dx, dy, dh) = got
    vr, newr, (dxr, dyr, dhr) = want
    assert_close(v, vr, rtol=1e-5, what=f"{what} value")
    assert_close((dx, dy), (dxr, dyr), rtol=1e-4, what=f"{what} dx, dy")
    assert_state_close(new, newr, what)
    if jnp.ndim(hp["temperature"]) == 0:
        # dL/dτ sums terms of both signs (see loss_cases.summed_terms), plus mean log(ε+u).
        t = float(hp["temperature"])
        scale = max(abs(float(dhr["temperature"])), summed_terms(x, y, hp, dxr, dyr)["temperature"])
        scale = max(scale, abs(float(vr)) / t)
        err = abs(float(dh["temperature"]) - float(dhr["temperature"]))
        assert err <= 1e-4 * scale, f"{what} dτ: {err:.2e} vs scale {scale:.2e}"
    else:  # per-anchor τ_i: each is one anchor's sum, compared norm-wise per direction
        for k in hp:
            assert_close(dh[k], dhr[k], rtol=1e-4, what=f"{what} d{k}")


def data_mesh(n: int):
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


# --- the reference on its own -----------------------------------------------------------------


def test_reference_hand_computed_case():
    """Two orthogonal unit pairs, τ = 1, γ = ½, u = 0: each anchor's one negative gives
    ĝ = exp(0 − 1) = e⁻¹, u' = e⁻¹/2, loss = log u' = −1 − log 2 and, per anchor,
    dL/dx_1 = (1/B) (τ/u') ĝ (y_2 − y_1)/τ = y_2 − y_1."""
    eye = jnp.eye(2, dtype=jnp.float32)
    start = jnp.full((2,), -jnp.inf)

    def f(x, y, t):
        return reference.global_infonce(
            x, y, start, start, gamma=0.5, temperature=t, symmetric=False
        )

    (v, (u, _)), (dx, dy, dt) = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(eye, eye, 1.0)
    assert float(v) == pytest.approx(-1.0 - math.log(2.0), rel=1e-6)
    np.testing.assert_allclose(u, [-1.0 - math.log(2.0)] * 2, rtol=1e-6)
    np.testing.assert_allclose(dx, [[-1.0, 1.0], [1.0, -1.0]], rtol=1e-6)
    # y_1 is anchor 1's positive (−x_1) and anchor 2's negative (+x_2).
    np.testing.assert_allclose(dy, [[-1.0, 1.0], [1.0, -1.0]], rtol=1e-6)
    # dL/dτ = log u' + (τ/u') ∂ĝ/∂τ = log u' + (1/u') e⁻¹ (1/τ²) = −1 − log 2 + 2.
    assert float(dt) == pytest.approx(1.0 - math.log(2.0), rel=1e-6)
    # The tiled loss on the same case, one anchor per tile.
    (v2, (u2, _)), (dx2, dy2) = jax.value_and_grad(
        lambda x, y: losses.global_infonce(
            x, y, start, gamma=0.5, temperature=1.0, symmetric=False, block_size=1
        ),
        (0, 1),
        has_aux=True,
    )(eye, eye)
    np.testing.assert_allclose((v2, *u2), (v, *u), rtol=1e-6)
    np.testing.assert_allclose((dx2, dy2), (dx, dy), rtol=1e-6)


@pytest.mark.parametrize("intra_view", [False, True])
def test_reference_at_gamma_one_is_tau_times_dcl(intra_view):
    """γ = 1, ε = 0: u' = ĝ, the weights are the batch softmax over negatives, and the
    gradients in x, y are τ times DCL's (Yeh et al.), whatever the state held."""
    x, y = embeddings(3, 12, 8)
    t = 0.2
    state = (initial_state(0, 12), initial_state(1, 12))
    with enable_x64():
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        g = jax.grad(
            lambda x, y: reference.global_infonce(
                x, y, *state, gamma=1.0, temperature=t, intra_view=intra_view
            )[0],
            (0, 1),
        )(x64, y64)
        dcl = jax.grad(
            lambda x, y: reference.decoupled(x, y, temperature=t, intra_view=intra_view), (0, 1)
        )(x64, y64)
    np.testing.assert_allclose(np.asarray(g), t * np.asarray(dcl), rtol=1e-10, atol=1e-14)


# --- tiled and ring against the reference -----------------------------------------------------


@st.composite
def cases(draw, rows: int, *, extra_ok: bool):
    """Static options of one drawn example."""
    per_anchor = draw(st.booleans())
    intra = not per_anchor and draw(st.booleans())
    opts = {
        "gamma": draw(st.sampled_from([0.1, 0.5, 0.9, 1.0])),
        "symmetric": draw(st.booleans()),
        "intra_view": intra,
        "rho": draw(st.sampled_from([0.0, 0.3])),
        "epsilon": draw(st.sampled_from([0.0, 1e-3])),
    }
    extra = draw(st.sampled_from([0, 0, rows // 2 + 1])) if extra_ok and not intra else 0
    return opts, per_anchor, extra


def _valid(seed: int, rows: int, use: bool):
    if not use:
        return None
    v = jax.random.uniform(jax.random.key(seed + 3), (rows,)) > 0.25
    return v.at[0].set(True).at[1].set(True)  # at least two valid pairs


@pytest.mark.slow  # a hypothesis sweep, like the other losses'; the fixed cases stay quick
def test_tiled_matches_reference():
    """Drawn batches, extra negatives, masks, tilings (mostly ragged), temperatures
    (scalar and per anchor), rates and states against the float64 reference."""
    drawn = []

    @settings(max_examples=10, deadline=None)
    @given(
        batch=st.integers(3, 96),
        dim=st.integers(1, 48),
        data=st.data(),
        temperature=temperatures.filter(lambda t: t <= 2.0),
        seed=st.integers(0, 2**16),
        masked=st.booleans(),
    )
    def check(batch, dim, data, temperature, seed, masked):
        opts, per_anchor, extra = data.draw(cases(batch, extra_ok=True), label="options")
        block = data.draw(block_sizes(batch), label="block_size")
        record(drawn, batch, block, per_anchor=per_anchor)
        x, y = embeddings(seed, batch, dim)
        if extra:
            y = jnp.concatenate([y, embeddings(seed + 1, extra, dim)[1]])
        opts = {**opts, "valid": _valid(seed, batch + extra, masked)}
        hp = temperature_args(temperature, batch, per_anchor, seed)
        state = (initial_state(seed, batch), initial_state(seed + 1, batch))
        if not opts["symmetric"]:
            state = state[:1]
            hp.pop("temperature_y", None)
        got = tiled(x, y, state, hp, opts, block=block)
        assert_matches(got, oracle(x, y, state, hp, opts), x, y, hp, f"{opts} {per_anchor}")

    check()
    assert_mix(drawn, layout=("ragged", 0.2), tiles=("several", 0.4), per_anchor=(True, 0.15))


def ring_run(x, y, state, hp, opts, *, n, block, check_vma):
    """Value, new state and gradients of the ring loss inside ``shard_map`` on ``n``
    devices; gradients taken outside, as a train step does."""
    data = P("data")
    hp_specs = {k: (P() if jnp.ndim(v) == 0 else data) for k, v in hp.items()}
    valid = opts.get("valid")
    rest = {k: v for k, v in opts.items() if k != "valid"}

    def local(x, y, state, hp, valid):
        loss, new = losses.global_infonce(
            x, y, *state, **hp, **rest, valid=valid, block_size=block, axis_name="data"
        )
        return loss, tuple(u for u in new if u is not None)

    sm = jax.shard_map(
        local,
        mesh=data_mesh(n),
        in_specs=(data, data, (data,) * len(state), hp_specs, None if valid is None else data),
        out_specs=(P(), (data,) * len(state)),
        check_vma=check_vma,
    )
    fn = lambda x, y, state, hp: sm(x, y, state, hp, valid)
    (v, new), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3), has_aux=True))(x, y, state, hp)
    return v, new, g


def check_ring(n, local_batch, dim, block, temperature, seed, opts, per_anchor, extra, check_vma):
    """Ring on ``n`` devices, local batches of ``local_batch`` pairs and ``extra`` extra
    negatives per device, against the reference on the same global batch."""
    batch = n * local_batch
    x, y = embeddings(seed, batch, dim)
    valid = opts.pop("valid", None)
    y_neg = embeddings(seed + 1, n * extra, dim)[1] if extra else y[:0]
    v_pos = None if valid is None else valid[:batch]
    v_neg = None if valid is None else valid[batch:]
    y_ring = losses.interleave(y, y_neg, n)  # the layout shard_map splits
    ring_opts = {**opts, "valid": None if valid is None else losses.interleave(v_pos, v_neg, n)}
    hp = temperature_args(temperature, batch, per_anchor, seed)
    state = (initial_state(seed, batch), initial_state(seed + 1, batch))
    if not opts["symmetric"]:
        state = state[:1]
        hp.pop("temperature_y", None)
    v, new, (dx, dy, dh) = ring_run(
        x, y_ring, state, hp, ring_opts, n=n, block=block, check_vma=check_vma
    )
    want = oracle(x, jnp.concatenate([y, y_neg]), state, hp, {**opts, "valid": valid})
    vr, newr, (dxr, dyr, dhr) = want
    dyr = np.asarray(losses.interleave(dyr[:batch], dyr[batch:], n))
    what = f"n={n} {opts} per_anchor={per_anchor} extra={extra} vma={check_vma}"
    assert_matches((v, new, (dx, dy, dh)), (vr, newr, (dxr, dyr, dhr)), x, y_ring, hp, what)


@pytest.mark.slow  # a hypothesis sweep (test_every_ring_size stays quick)
def test_ring_matches_reference():
    """Drawn ring sizes, local batches, options and tilings of each device's block."""
    drawn = []

    @settings(max_examples=8, deadline=None)
    @given(
        n=st.sampled_from([1, 2, 4, 8]),
        local_batch=st.integers(3, 12),
        dim=st.integers(1, 24),
        data=st.data(),
        temperature=temperatures.filter(lambda t: t <= 2.0),
        seed=st.integers(0, 2**16),
        check_vma=st.booleans(),
        masked=st.booleans(),
    )
    def check(n, local_batch, dim, data, temperature, seed, check_vma, masked):
        opts, per_anchor, extra = data.draw(cases(local_batch, extra_ok=True), label="options")
        block = data.draw(block_sizes(local_batch), label="block_size")
        record(drawn, local_batch, block, devices="several" if n > 1 else "one")
        extra = min(extra, 4)
        opts["valid"] = _valid(seed, n * (local_batch + extra), masked)
        check_ring(
            n, local_batch, dim, block, temperature, seed, opts, per_anchor, extra, check_vma
        )

    check()
    assert_mix(drawn, layout=("ragged", 0.2), devices=("several", 0.25))


RING_CASES = [
    ({"gamma": 0.9, "symmetric": True, "intra_view": False}, False, 0),
    ({"gamma": 0.5, "symmetric": True, "intra_view": True}, False, 0),
    ({"gamma": 0.3, "symmetric": True, "intra_view": False, "rho": 0.2}, True, 0),
    ({"gamma": 0.7, "symmetric": False, "intra_view": False}, False, 2),
]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_every_ring_size(n):
    """Each ring size meets one option set (rotating), ragged tiles (5 rows, block 2),
    masks, and both check_vma settings."""
    k = [1, 2, 4, 8].index(n)
    opts, per_anchor, extra = RING_CASES[k]
    opts = {**opts, "valid": _valid(n, n * (5 + extra), True)}
    check_ring(n, 5, 12, 2, 0.2, n, opts, per_anchor, extra, k % 2 == 0)


# --- numerics, memory, errors -----------------------------------------------------------------


def test_small_temperature_state_stays_finite():
    """τ = 0.005 with negatives that beat the positive: ĝ ~ exp(300) overflows float32,
    log u does not, and the gradient weights stay bounded by τ/γ."""
    x, y = embeddings(4, 40, 8)
    y = y.at[:20].set(-y[:20])  # half the positives are the worst candidates
    state = (jnp.full((40,), -jnp.inf), jnp.zeros((40,)))
    hp = {"temperature": jnp.float32(0.005)}
    opts = {"gamma": 0.9}
    got = tiled(x, y, state, hp, opts, block=16)
    want = oracle(x, y, state, hp, opts)
    assert np.max(want[1][0]) > 100.0  # log u beyond float32's exp range
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(got))
    assert_matches(got, want, x, y, hp, "tau=0.005")


def test_traced_gamma_and_state_roundtrip():
    """γ from a schedule (traced) and two steps that feed the state back: as the
    reference, and the data-set state gathered and scattered by id."""
    x, y = embeddings(9, 24, 6)
    store = jnp.full((100,), -jnp.inf)
    ids = jnp.arange(24) * 3
    f = jax.jit(
        lambda x, y, u, g: losses.global_infonce(x, y, u, u, gamma=g, temperature=0.1, block_size=7)
    )
    r = lambda x, y, u, g: reference.global_infonce(x, y, u, u, gamma=g, temperature=0.1)
    u_ref = store[ids]
    for step, g in enumerate([1.0, 0.6]):
        loss, (ux, _) = f(x, y, store[ids], jnp.float32(g))
        loss_r, (ux_r, _) = r(x, y, u_ref, g)
        assert_close(loss, loss_r, rtol=1e-5, what=f"step {step}")
        assert_state_close((ux,), (ux_r,), f"step {step}")
        store, u_ref = store.at[ids].set(ux), ux_r
        x = x + 0.05 * jnp.roll(x, 1, axis=0)  # the model moved
    assert bool(jnp.all(jnp.isinf(jnp.delete(store, ids))))  # only the batch's rows changed


@pytest.mark.parametrize("per_anchor", [False, True], ids=["sogclr", "isogclr"])
def test_bfloat16_inputs_match_float32(per_anchor):
    """bfloat16 embeddings: the same loss, state and gradients as float32 on the same
    (bfloat16-representable) values, to bfloat16's rounding of the tile products."""
    x, y = embeddings(5, 200, 64, dtype=jnp.bfloat16)
    hp = temperature_args(0.1, 200, per_anchor, 5)
    state = (initial_state(5, 200), initial_state(6, 200))
    v, new, g = tiled(x, y, state, hp, {"gamma": 0.8}, block=64)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    v32, new32, g32 = tiled(x32, y32, state, hp, {"gamma": 0.8}, block=64)
    eps = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7
    assert_close(v, v32, rtol=eps, what="bf16 value")
    assert_close(new, new32, rtol=eps, what="bf16 log u")
    assert_close(g, g32, rtol=4 * eps, what="bf16 gradients")


def _temp_bytes(fn, *specs) -> int:
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("per_anchor", [False, True], ids=["sogclr", "isogclr"])
def test_memory_at_65k_pairs_within_twice_infonce(per_anchor):
    """value_and_grad at B = 65,536, D = 256: temporaries within 2x the tiled InfoNCE's
    (the state is (B,) float32 vectors, 256 KiB each), with a scalar temperature and with
    per-anchor temperatures (whose gradients are (B,) vectors too)."""
    spec = jax.ShapeDtypeStruct((65536, 256), jnp.float32)
    u = jax.ShapeDtypeStruct((65536,), jnp.float32)

    def loss(x, y, ux, uy, t, ty):
        hp = {"temperature": t, "temperature_y": ty} if per_anchor else {"temperature": 0.1}
        return losses.global_infonce(x, y, ux, uy, gamma=0.9, **hp)[0]

    glob = jax.value_and_grad(loss, argnums=(0, 1, 4, 5) if per_anchor else (0, 1))
    plain = jax.value_and_grad(lambda x, y: losses.infonce(x, y), argnums=(0, 1))
    t_glob = _temp_bytes(glob, spec, spec, u, u, u, u)
    t_plain = _temp_bytes(plain, spec, spec)
    print(f"\nglobal {t_glob / MiB:.1f} MiB vs infonce {t_plain / MiB:.1f} MiB")
    assert t_glob <= 2 * t_plain, f"{t_glob / MiB:.0f} MiB vs {t_plain / MiB:.0f} MiB"
    assert t_plain <= 128 * MiB  # both are far from the dense ~32 GiB


ERRORS = [
    (dict(log_u_x=jnp.zeros((5,))), ValueError, r"log_u_x must have shape \(4,\)"),
    (dict(log_u_y=None), ValueError, "log_u_y is needed"),
    (dict(gamma=0.0), ValueError, "gamma must be > 0"),
    (dict(gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=jnp.ones((3,))), ValueError, r"temperature must be a scalar or .*\(4,\)"),
    (dict(temperature=-jnp.ones((4,))), ValueError, "every entry of temperature"),
    (dict(temperature=0.1, temperature_y=jnp.ones((4,))), ValueError, "temperature_y is for"),
    (dict(temperature=jnp.ones((4,)), intra_view=True), ValueError, "intra_view=False"),
    (dict(rho=-1.0), ValueError, "rho must be >= 0"),
    (dict(epsilon=-1.0), ValueError, "epsilon must be >= 0"),
    (dict(x=jnp.ones((1, 3)), y=jnp.ones((1, 3))), ValueError, "at least 2 pairs"),
    (dict(block_size=0), ValueError, "block_size"),
]


@pytest.mark.parametrize("change,error,message", ERRORS)
def test_errors(change, error, message):
    args = dict(
        x=jnp.ones((4, 3)), y=jnp.ones((4, 3)), log_u_x=jnp.zeros((4,)), log_u_y=jnp.zeros((4,))
    )
    args.update({k: v for k, v in change.items() if k in args})
    kwargs = {"gamma": 0.5, **{k: v for k, v in change.items() if k not in args}}
    with pytest.raises(error, match=message):
        losses.global_infonce(args["x"], args["y"], args["log_u_x"], args["log_u_y"], **kwargs)
