"""The negative queue: FIFO order, no gradient into queued rows, the losses with the queue
against the float64 dense oracle on 1, 2, 4 and 8 simulated devices, ids, bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import losses
from contrastive.mesh import make_mesh
from contrastive.step.negative_queue import (
    QUEUE_ROWS,
    NegativeQueue,
    check_queue_length,
    init_queue,
    place_queue,
    push,
    queue_specs,
    queued_loss_fn,
    with_negatives,
)
from tests.loss_cases import (
    LOSSES,
    OPTIONS,
    assert_close,
    assert_hyper_grads_close,
    block_sizes,
    embeddings,
    hyper,
    oracle,
    summed_terms,
    temperatures,
)

ROWS = P("data")


def _per_row(ids, valid) -> dict:
    return {k: v for k, v in (("ids", ids), ("valid", valid)) if v is not None}


@functools.cache
def _push_step(mesh, check_vma: bool):
    def local(queue, y, per_row):
        return push(queue, y, per_row.get("ids"), per_row.get("valid"))

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(queue_specs(), ROWS, ROWS),
            out_specs=queue_specs(),
            check_vma=check_vma,
        )
    )


def pushed(queue: NegativeQueue, history: list, mesh, *, check_vma: bool = True):
    """The queue after pushing each ``(y [B, D], ids [B] | None, valid [B] | None)`` of
    ``history`` in turn, inside ``shard_map``."""
    step = _push_step(mesh, check_vma)
    for y, ids, valid in history:
        queue = step(queue, y, _per_row(ids, valid))
    return queue


@functools.cache
def _queued_loss_grads(name: str, opts: tuple, mesh, check_vma: bool, block: int | None):
    f = getattr(losses, name)

    def local(x, y, hp, per_row, queue):
        y_ext, ids_ext, valid_ext = with_negatives(
            y, per_row.get("ids"), per_row.get("valid"), queue
        )
        masks = _per_row(ids_ext, valid_ext)
        return f(x, y_ext, **hp, **dict(opts), **masks, block_size=block, axis_name="data")

    sm = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(ROWS, ROWS, P(), ROWS, queue_specs()),
        out_specs=P(),
        check_vma=check_vma,
    )

    def loss(x, y, hp, queued_embeddings, per_row, queue):
        return sm(x, y, hp, per_row, queue._replace(embeddings=queued_embeddings))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def queued_value_and_grads(name, opts, x, y, hp, ids, valid, queue, mesh, *, check_vma, block):
    """Loss and gradients w.r.t. (x, y, hyperparameters, queued embeddings) of the ring loss
    with the queue appended by ``with_negatives``; the gradient is taken outside shard_map.
    Compiled once per loss, options, mesh and shapes."""
    f = _queued_loss_grads(name, tuple(sorted(opts.items())), mesh, check_vma, block)
    return f(x, y, hp, queue.embeddings, _per_row(ids, valid), queue)


def random_history(seed: int, pushes: int, batch: int, dim: int, id_range, valid_share: float):
    """``pushes`` past batches ``(y, ids, valid)``, each of ``batch`` rows."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(pushes):
        _, y = embeddings(seed + 1 + t, batch, dim)
        ids = None if id_range is None else jnp.asarray(rng.integers(0, id_range, batch), jnp.int32)
        valid = None if valid_share == 1.0 else jnp.asarray(rng.random(batch) < valid_share)
        out.append((y, ids, valid))
    return out


def oracle_layout(y, ids, valid, retained: list):
    """The oracle's ``y`` ``[B + R·B, D]``, ``ids``, ``valid``: the batch's positives, then
    every retained past batch (in any order: the order of negatives does not matter)."""
    ones = lambda a: jnp.ones((a.shape[0],), bool)
    y_all = jnp.concatenate([y] + [h[0] for h in retained])
    valid_all = jnp.concatenate(
        [ones(y) if valid is None else valid]
        + [ones(h[0]) if h[2] is None else h[2] for h in retained]
    )
    ids_all = None if ids is None else jnp.concatenate([ids] + [h[1] for h in retained])
    return y_all, ids_all, valid_all


def check_queued_loss(
    name, opts, n, b, steps, fills, dim, id_range, valid_share, temperature, seed, check_vma,
    block,
):  # fmt: skip
    """Push batches one by one; after ``fills[0]``, ``fills[1]``, ... pushes, compare the
    loss with the queue against the oracle on the batch plus the last K pushed batches."""
    mesh = make_mesh(num_devices=n)
    batch = n * b
    x, y = embeddings(seed, batch, dim)
    history = random_history(seed, max(fills) + 1, batch, dim, id_range, valid_share)
    *history, (_, ids, valid) = history  # the current batch's masks, drawn like the past's
    hp = hyper(name, temperature, -2.0)
    queue = place_queue(init_queue(steps, b, dim, devices=n), mesh)
    done = 0
    for pushes in sorted(fills):
        queue = pushed(queue, history[done:pushes], mesh, check_vma=check_vma)
        done = pushes
        got_v, (got_dx, got_dy, got_dh, got_dq) = queued_value_and_grads(
            name, opts, x, y, hp, ids, valid, queue, mesh, check_vma=check_vma, block=block
        )
        retained = history[max(0, pushes - steps) : pushes]  # FIFO: the last K pushes
        y_all, ids_all, valid_all = oracle_layout(y, ids, valid, retained)
        masked = {**opts, "valid": valid_all, "ids": ids_all}
        want_v, (want_dx, want_dy, want_dh) = oracle(name, masked, x, y_all, hp)
        what = (
            f"{name}{opts} n={n} b={b} D={dim} K={steps} pushes={pushes} ids<{id_range} "
            f"valid={valid_share} vma={check_vma} block={block}"
        )
        assert_close(got_v, want_v, rtol=1e-5, what=what + " value")
        assert_close((got_dx, got_dy), (want_dx, want_dy[:batch]), rtol=1e-4, what=what + " dx, dy")
        terms = summed_terms(x, y_all, hp, want_dx, want_dy, valid_all, ids_all)
        assert_hyper_grads_close(got_dh, want_dh, terms, what=what)
        # The queued rows are constants: exactly no gradient flows into them.
        assert not np.any(np.asarray(got_dq)), what + ": gradient reached the queued rows"


def _options(name):
    # The same-view terms need M = B: a queue (extra negatives) cannot go with intra_view.
    return st.sampled_from([o for o in OPTIONS[name] if not o.get("intra_view")])


@pytest.mark.parametrize("n", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", LOSSES)
def test_queued_loss_matches_dense_oracle(name, n):
    """Loss and gradients with a drawn queue (K, b, D, ids, padding) equal the oracle on
    ``[y; the last K pushed batches]``, once with some slots empty and once full or
    wrapped around (the oldest batches gone); the queued rows get zero gradient."""

    @settings(max_examples=2, deadline=None)
    @given(
        opts=_options(name),
        b=st.integers(1, 4),
        steps=st.sampled_from([2, 3, 1]),  # K = 1 (one slot, always overwritten) too
        data=st.data(),
        dim=st.integers(1, 12),
        id_range=st.one_of(st.none(), st.integers(1, 5)),
        valid_share=st.sampled_from([1.0, 0.7]),
        temperature=temperatures,
        seed=st.integers(0, 2**16),
        check_vma=st.booleans(),
    )
    def check(
        opts, b, steps, data, dim, id_range, valid_share, temperature, seed, check_vma
    ):  # fmt: skip
        if name == "decoupled" and n * b < 2:
            b = 2  # DCL needs two pairs
        partial = data.draw(st.integers(0, steps - 1), label="pushes (some slots empty)")
        full = data.draw(st.integers(steps, steps + 2), label="pushes (full or wrapped)")
        block = data.draw(block_sizes(b + steps * b), label="block_size")
        check_queued_loss(
            name, opts, n, b, steps, (partial, full), dim, id_range, valid_share, temperature,
            seed, check_vma, block,
        )  # fmt: skip

    check()


def test_fifo_order_over_more_than_k_pushes():
    """Slot t mod K holds push t; the oldest is overwritten; empty slots stay invalid; each
    device keeps its own rows, and with_negatives appends them after the local positives."""
    n, b, steps, dim = 2, 3, 3, 2
    mesh = make_mesh(num_devices=n)
    queue = place_queue(init_queue(steps, b, dim, devices=n), mesh)
    rows = np.arange(n * b)

    def batch(t):  # row r of push t holds (t, r): which push and which row, readable back
        y = np.stack([np.full(n * b, t, np.float32), rows.astype(np.float32)], axis=1)
        return jnp.asarray(y), jnp.asarray(1000 * t + rows, jnp.int32), None

    for t in range(2 * steps + 1):
        queue = pushed(queue, [batch(t)], mesh)
        assert int(queue.position) == (t + 1) % steps
        emb = np.asarray(queue.embeddings).reshape(n, steps, b, dim)
        ids = np.asarray(queue.ids).reshape(n, steps, b)
        valid = np.asarray(queue.valid).reshape(n, steps, b)
        for slot in range(steps):
            holders = [u for u in range(t + 1) if u % steps == slot]
            if not holders:
                assert not valid[:, slot].any() and (ids[:, slot] == -1).all()
                continue
            u = holders[-1]  # the latest push into this slot: older ones overwritten
            assert valid[:, slot].all()
            for device in range(n):
                mine = rows[device * b : (device + 1) * b]  # the device's own rows
                np.testing.assert_array_equal(emb[device, slot, :, 0], u)
                np.testing.assert_array_equal(emb[device, slot, :, 1], mine)
                np.testing.assert_array_equal(ids[device, slot], 1000 * u + mine)

    # Inside shard_map, y_ext is the ring layout [local positives; local queue] per device.
    y, ids, _ = batch(99)

    def local(y, ids, queue):
        return with_negatives(y, ids, None, queue)

    y_ext, ids_ext, valid_ext = jax.shard_map(
        local, mesh=mesh, in_specs=(ROWS, ROWS, queue_specs()), out_specs=ROWS
    )(y, ids, queue)
    np.testing.assert_array_equal(y_ext, losses.interleave(y, queue.embeddings, n))
    np.testing.assert_array_equal(ids_ext, losses.interleave(ids, queue.ids, n))
    np.testing.assert_array_equal(
        valid_ext, losses.interleave(jnp.ones(n * b, bool), queue.valid, n)
    )


@pytest.mark.parametrize("name", LOSSES)
def test_a_queued_copy_of_the_anchor_is_not_its_negative(name):
    """A batch pushed and met again (the same examples, the same ids): each anchor's own
    earlier copy is excluded, the others' copies stay negatives, as the oracle with ids says;
    without ids the copies count, and the loss differs."""
    n, b, steps, dim = 2, 4, 2, 8
    mesh = make_mesh(num_devices=n)
    x, y = embeddings(7, n * b, dim)
    ids = jnp.arange(n * b, dtype=jnp.int32)
    _, other = embeddings(8, n * b, dim)
    history = [(y, ids, None), (other, ids + 100, None)]
    queue = pushed(place_queue(init_queue(steps, b, dim, devices=n), mesh), history, mesh)
    hp = hyper(name, 0.2, -2.0)
    opts = {}
    got = queued_value_and_grads(
        name, opts, x, y, hp, ids, None, queue, mesh, check_vma=True, block=None
    )
    y_all, ids_all, valid_all = oracle_layout(y, ids, None, history)
    want_v, (want_dx, want_dy, _) = oracle(name, {"ids": ids_all, "valid": valid_all}, x, y_all, hp)
    assert_close(got[0], want_v, rtol=1e-5, what=f"{name} value")
    assert_close(got[1][:2], (want_dx, want_dy[: n * b]), rtol=1e-4, what=f"{name} dx, dy")
    # Without ids the earlier copy of each positive is a negative of its own anchor.
    no_ids = queued_value_and_grads(
        name, opts, x, y, hp, None, None, queue, mesh, check_vma=True, block=None
    )
    want_no_ids, _ = oracle(name, {"valid": valid_all}, x, y_all, hp)
    assert_close(no_ids[0], want_no_ids, rtol=1e-5, what=f"{name} value without ids")
    assert abs(float(want_no_ids) - float(want_v)) > 1e-3 * abs(float(want_v))


def test_push_and_with_negatives_communicate_nothing():
    """Each device reads and writes only its own rows: no collective in the compiled step."""
    n, b, steps, dim = 4, 2, 3, 5
    mesh = make_mesh(num_devices=n)
    queue = place_queue(init_queue(steps, b, dim, devices=n), mesh)

    def local(y, queue):
        y_ext, _, valid_ext = with_negatives(y, None, None, queue)
        return y_ext, valid_ext, push(queue, y)

    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(ROWS, queue_specs()),
            out_specs=(ROWS, ROWS, queue_specs()),
        )
    )
    hlo = f.lower(jnp.ones((n * b, dim)), queue).compile().as_text()
    for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"):
        assert op not in hlo, op


def test_queued_loss_fn_wraps_the_train_step_loss():
    """``queued_loss_fn`` around ``make_loss_fn``: the loss on [y; queue] equals the oracle
    with the model's temperature and bias, and aux carries this device's positives."""
    from flax import nnx

    from contrastive.models import DualEncoder, MLPEncoder
    from contrastive.step.train_step import make_loss_fn
    from contrastive.step_configs import LossConfig

    n, b, steps, dim = 2, 3, 2, 6
    mesh = make_mesh(num_devices=n)
    rngs = nnx.Rngs(0)
    model = DualEncoder(MLPEncoder(4, 8, 1, rngs=rngs), embed_dim=dim, init_bias=-3.0, rngs=rngs)
    graphdef, params = nnx.split(model)
    cfg = LossConfig("sigmoid")
    x, y = embeddings(3, n * b, dim)
    history = random_history(3, 3, n * b, dim, 4, 0.7)  # 3 pushes into 2 slots: one dropped
    queue = pushed(place_queue(init_queue(steps, b, dim, devices=n), mesh), history, mesh)
    ids = jnp.arange(n * b, dtype=jnp.int32) % 4

    def local(params, x, y, ids, queue):
        make = lambda i, v: make_loss_fn(graphdef, cfg, "data", i, v)
        loss, aux = queued_loss_fn(make, queue, ids=ids)(params, (x, y))
        return loss, aux[QUEUE_ROWS]

    loss, rows = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), ROWS, ROWS, ROWS, queue_specs()),
            out_specs=(P(), ROWS),
            check_vma=False,
        )
    )(params, x, y, ids, queue)
    y_all, ids_all, valid_all = oracle_layout(y, ids, None, history[-steps:])
    hp = {"temperature": model.temperature(), "bias": model.bias_value()}
    want, _ = oracle("sigmoid", {"ids": ids_all, "valid": valid_all}, x, y_all, hp)
    assert_close(loss, want, rtol=1e-5, what="queued make_loss_fn")
    np.testing.assert_array_equal(rows, y)


def test_bad_input_is_a_one_line_value_error():
    q = init_queue(2, 3, 4)
    y = jnp.ones((3, 4))
    bad = [
        (lambda: init_queue(0, 3, 4), "steps"),
        (lambda: init_queue(2, 0, 4), "rows_per_device"),
        (lambda: init_queue(2, 3, 4, jnp.int32), "float dtype"),
        (lambda: init_queue(2, 3, 4, devices=0), "devices"),
        (lambda: push(q, jnp.ones((3, 5))), "dimension 5"),
        (lambda: push(q, jnp.ones((4, 4))), "multiple of the 4 rows"),
        (lambda: push(q, jnp.ones(4)), r"shape \(rows, D\)"),
        (lambda: push(q, y, ids=jnp.zeros(2, jnp.int32)), r"ids must have shape \(3,\)"),
        (lambda: push(q, y, ids=jnp.zeros(3)), "integer"),
        (lambda: push(q, y, valid=jnp.ones(3, jnp.int32)), "bool"),
        (lambda: with_negatives(jnp.ones((3, 5)), None, None, q), "dimension 5"),
        (lambda: with_negatives(y, None, jnp.ones(4, bool), q), r"valid must have shape \(3,\)"),
        (lambda: place_queue(init_queue(1, 1, 4, devices=3), make_mesh(num_devices=2)), "split"),
        (lambda: check_queue_length(4, 256, 1024), "--negative-queue 4 spans more than an epoch"),
        (lambda: check_queue_length(0, 256, 1024), "positive int"),
        (lambda: check_queue_length(1, 600, 1000), "smaller batch"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)
    check_queue_length(3, 256, 1024)  # K + 1 batches are exactly one epoch: fine
