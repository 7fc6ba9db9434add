"""Two processes ("hosts") with 4 CPU devices each give what one process with 8 gives."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import losses
from tests import processes
from tests.multihost_cases import CASES, inputs
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_hosts_match_one(tmp_path):
    out = tmp_path / "two_hosts.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    worker = [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(free_port())]
    results = processes.finish(
        processes.start([[*worker, str(i), str(out)] for i in range(2)], env), timeout=400
    )
    for i, (code, log) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{log[-3000:]}"
    two = np.load(out)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in inputs())
    for key, (name, opts) in CASES.items():
        loss = losses.sharded(getattr(losses, name), mesh, "data")
        value, (dx, dy) = jax.jit(
            jax.value_and_grad(functools.partial(loss, **opts), argnums=(0, 1))
        )(x, y)
        np.testing.assert_allclose(two[f"{key}/value"], value, rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(two[f"{key}/dx"], dx, rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(two[f"{key}/dy"], dy, rtol=1e-5, atol=1e-7, err_msg=key)
