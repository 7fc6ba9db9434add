"""One of two processes ("hosts") computing the ring losses on a global 8-device mesh.

Run by tests/test_multihost.py: ``python multihost_worker.py PORT PROCESS_ID OUT_FILE``.
Each process has 4 CPU devices; gloo carries the collectives between them. Process 0
writes the losses and gradients (gathered to host) to OUT_FILE as .npz.
"""

import functools
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
# A missing peer ends this process after these deadlines instead of hanging forever; they
# leave room for a machine loaded several times over (a peer's start-up, or its exit, can lag
# by a minute there) and stay within the test's own wait.
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=pid,
    initialization_timeout=180,
    heartbeat_timeout_seconds=60,
    shutdown_timeout_seconds=120,
)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import losses  # noqa: E402
from tests.multihost_cases import CASES, inputs  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
x_all, y_all = inputs()
rows = slice(pid * 16, (pid + 1) * 16)  # this host's half of the global batch of 32
x = jax.make_array_from_process_local_data(sharding, x_all[rows], x_all.shape)
y = jax.make_array_from_process_local_data(sharding, y_all[rows], y_all.shape)

results = {}
for key, (name, opts) in CASES.items():
    loss = losses.sharded(getattr(losses, name), mesh, "data")
    fn = jax.jit(jax.value_and_grad(functools.partial(loss, **opts), argnums=(0, 1)))
    value, (dx, dy) = fn(x, y)
    results[f"{key}/value"] = np.asarray(value)
    results[f"{key}/dx"] = multihost_utils.process_allgather(dx, tiled=True)
    results[f"{key}/dy"] = multihost_utils.process_allgather(dy, tiled=True)
if pid == 0:
    np.savez(out, **results)
jax.distributed.shutdown()
