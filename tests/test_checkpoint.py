"""Checkpointer: periodic saves, keep-last-k, sharded restore, PRNG keys, atomicity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from contrastive.checkpoint import Checkpointer


def _state(mesh=None):
    w = jnp.arange(32.0).reshape(8, 4)
    if mesh is not None:
        w = jax.device_put(w, NamedSharding(mesh, PartitionSpec("data")))
    return {
        "params": {"w": w, "b": jnp.ones(3, jnp.bfloat16)},
        "key": jax.random.key(42),
        "step": jnp.int32(0),
    }


def test_save_every_and_keep_last(tmp_path):
    with Checkpointer(tmp_path, every=3, keep=2) as ckpt:
        saved = [s for s in range(1, 13) if ckpt.maybe_save(s, _state(), {"step": s})]
        assert saved == [3, 6, 9, 12]
        assert ckpt.all_steps() == [9, 12]
        assert ckpt.latest_step() == 12


def test_restore_or_returns_template_when_empty(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        state = _state()
        restored, meta = ckpt.restore_or(state)
        assert restored is state and meta == {}


def test_roundtrip_sharded_state_keys_and_meta(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = _state(mesh)
    state["step"] = jnp.int32(5)
    _, state["key"] = jax.random.split(state["key"])
    meta = {"step": 5, "data": {"position": 5}, "seed": 0}
    with Checkpointer(tmp_path, every=5) as ckpt:
        assert ckpt.save(5, state, meta)
    # A fresh process would build the template from scratch: different values, same layout.
    template = _state(mesh)
    with Checkpointer(tmp_path, every=5) as ckpt:
        restored, got_meta = ckpt.restore_or(template)
    assert got_meta == meta
    assert restored["params"]["w"].sharding == template["params"]["w"].sharding
    assert restored["params"]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert int(restored["step"]) == 5
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(state["key"])
    )
    # Same key, same random numbers after resume.
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"], (4,)), jax.random.normal(state["key"], (4,))
    )


def test_partial_checkpoint_is_ignored(tmp_path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _state(), {"step": 1})
    # What a run killed mid-write leaves: orbax's temporary folder, never renamed.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    with Checkpointer(tmp_path, every=1) as ckpt:
        assert ckpt.latest_step() == 1
        _, meta = ckpt.restore_or(_state())
        assert meta == {"step": 1}


def test_bad_options():
    with pytest.raises(ValueError, match="interval"):
        Checkpointer("/tmp/unused", every=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer("/tmp/unused", every=1, keep=0)
