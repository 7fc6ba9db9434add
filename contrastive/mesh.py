"""The one place that builds meshes and shardings for the training system.

Data parallelism over a single mesh axis ``"data"``: the global batch is split along its
first axis over every device (one host or many: ``jax.devices()`` is global after
``jax.distributed.initialize()``); parameters are replicated. The optimiser state is
replicated too, or sharded along ``"data"`` (ZeRO-1/2, Rajbhandari et al. 2020) by
:func:`shard_axis`: each leaf is split along its first axis that the device count
divides, and the gradients of the same leaves are reduce-scattered along the same axis
(:func:`scatter_axes`), so the optimiser update needs no communication but the final
all-gather of the parameter updates. :func:`param_sharding` takes a per-leaf rule so
that FSDP-style sharding of large weights can be added without touching the train step.
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
    "place",
    "place_params",
    "check_batch_divisible",
    "shard_axis",
    "scatter_axes",
    "mark_varying",
    "optimizer_shardings",
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
    """Place a host-global batch on the mesh, rows split over ``"data"`` (each array may
    have its own number of rows, a multiple of the device count).

    Single process: ``batch`` holds the whole global batch. Multi-process: each process
    passes its own rows, and they are assembled into one global array.
    """
    n = mesh.shape[DATA_AXIS]
    for leaf in jax.tree_util.tree_leaves(batch):
        rows = np.shape(leaf)[0]
        if rows % n:
            raise ValueError(
                f"a batch array of {rows} rows (shape {np.shape(leaf)}) does not split over {n} "
                f"devices; use a multiple of {n} (e.g. {max(n, rows - rows % n)})."
            )
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def place(tree: Any, shardings: Any) -> Any:
    """Put a host value that every process holds whole (parameters, a train state, a key)
    on the mesh with ``shardings`` (a sharding or a matching pytree of them).

    One process: ``jax.device_put``. Several: each process builds the shards of its own
    devices (``device_put`` cannot target another process's devices).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def one(x, sharding):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree, shardings)


def place_params(params: Any, mesh: Mesh, rule: Callable[[Any], PartitionSpec] | None = None):
    """Put parameters (or a whole train state) on the mesh; replicated by default."""
    return place(params, param_sharding(mesh, params, rule))


def shard_axis(shape: Sequence[int], devices: int) -> int | None:
    """The axis a leaf of ``shape`` is split along over ``devices`` devices, or None.

    The first axis whose length the device count divides; None (replicated) for scalars,
    for leaves no axis of which splits evenly, and on a single device.
    """
    if devices == 1:
        return None
    for axis, size in enumerate(shape):
        if size % devices == 0:
            return axis
    return None


def scatter_axes(params: Any, devices: int) -> Any:
    """Per leaf of ``params``: the axis its gradient is reduce-scattered along, or None."""
    return jax.tree_util.tree_map(lambda p: shard_axis(np.shape(p), devices), params)


def mark_varying(params: Any, axis_name: str = DATA_AXIS) -> Any:
    """``params`` marked as varying over ``axis_name``, inside ``shard_map``, before anything
    is differentiated: JAX transposes a replicated value into an all-reduce, so
    differentiating the replicated parameters would reduce their gradient in every chunk's
    backward pass, instead of once per step where the step reduces it."""
    return jax.tree_util.tree_map(lambda p: jax.lax.pcast(p, axis_name, to="varying"), params)


def optimizer_shardings(opt_state: Any, mesh: Mesh) -> Any:
    """Shardings of an optimiser state split along ``"data"`` by :func:`shard_axis`."""
    n = mesh.shape[DATA_AXIS]

    def one(leaf):
        axis = shard_axis(np.shape(leaf), n)
        spec = PartitionSpec() if axis is None else PartitionSpec(*([None] * axis), DATA_AXIS)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(one, opt_state)
