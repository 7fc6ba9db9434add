"""Two processes ("hosts") with 4 CPU devices each give what one process with 8 gives."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import losses
from tests.multihost_cases import CASES, inputs

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_match_one(tmp_path):
    out = tmp_path / "two_hosts.npz"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "multihost_worker.py"),
                str(port),
                str(i),
                str(out),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # never leave a peer waiting on a dead test
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
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
