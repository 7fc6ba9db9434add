"""The one place that builds meshes and shardings for the training system.

Data parallelism over a single mesh axis ``"data"``: the global batch is split along its
first axis over every device (one host or many: ``jax.devices()`` is global after
``jax.distributed.initialize()``); parameters and optimiser state are replicated by
default. :func:`param_sharding` takes a per-leaf rule so that FSDP-style sharding of large
weights can be added later without touching the train step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "param_sharding",
    "shard_batch",
    "place_params",
    "check_batch_divisible",
]


def make_mesh(
    devices: Sequence[jax.Device] | None = None, *, num_devices: int | None = None
) -> Mesh:
    """A 1-D data-parallel mesh ``("data",)`` over ``devices`` (default: all of them).

    The axis type is ``Auto`` so that plain ``jax.jit`` with ``NamedSharding`` propagates
    shardings (GSPMD) and ``jax.shard_map`` can take over the axis for the ring losses.

    Args:
      devices: devices to use; default ``jax.devices()`` (all hosts).
      num_devices: use only the first ``num_devices`` of them (tests, benchmarks).
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices={num_devices} but {len(devices)} devices are present; pass a "
                f"value between 1 and {len(devices)}."
            )
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a global batch leaf [B, ...]: rows split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding (parameters, optimiser state, keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def param_sharding(
    mesh: Mesh, params: Any, rule: Callable[[Any], PartitionSpec] | None = None
) -> Any:
    """Per-leaf shardings of ``params``: replicated unless ``rule(leaf)`` says otherwise.

    ``rule`` maps a leaf (array or ShapeDtypeStruct) to a ``PartitionSpec``; an FSDP rule
    would shard the largest axis of big weights over ``"data"``.
    """
    rule = rule or (lambda _: PartitionSpec())
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, rule(x)), params)


def check_batch_divisible(batch: Any, mesh: Mesh) -> int:
    """The global batch size; ValueError when it does not split evenly over the devices."""
    sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"every batch array needs the same leading axis, got sizes {sizes}.")
    b = sizes.pop()
    n = mesh.shape[DATA_AXIS]
    if b % n:
        raise ValueError(
            f"global batch of {b} rows does not split over {n} devices; use a batch size that "
            f"is a multiple of {n} (e.g. {max(n, b - b % n)})."
        )
    return b


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host-global batch on the mesh, rows split over ``"data"``.

    Single process: ``batch`` holds the whole global batch. Multi-process: each process
    passes its own rows, and they are assembled into one global array.
    """
    check_batch_divisible(batch, mesh)
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def place_params(params: Any, mesh: Mesh, rule: Callable[[Any], PartitionSpec] | None = None):
    """Put parameters (or a whole train state) on the mesh; replicated by default."""
    return jax.device_put(params, param_sharding(mesh, params, rule))
