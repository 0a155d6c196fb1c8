"""Data parallelism: the 1-D 'data' mesh, batch sharding, and the shard_map step wrapper."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh with axis 'data' over `devices` (default: all of all processes, process-major)."""
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the same on every process) -> replicated global jax.Arrays."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits axis 0 over 'data' and replicates the rest."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays sharded along axis 0 over 'data'.

    The global batch is the concatenation of every process's batch in process order.
    Non-numeric leaves (names, paths) are dropped: they cannot live on a device.
    """
    sharding = batch_sharding(mesh)
    n_local = len(mesh.local_devices)
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            continue
        if arr.ndim == 0 or arr.shape[0] % n_local:
            raise ValueError(
                f"batch['{key}'] has shape {arr.shape}: its leading (batch) size must be a "
                f"multiple of this process's {n_local} devices; change the global batch size"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, arr)
    return out


def global_mean(x: Any) -> Any:
    """Mean over the 'data' axis inside a shard_map'd function (per-device means -> batch mean)."""
    return jax.lax.pmean(x, DATA_AXIS)


def device_varying(tree: Any) -> Any:
    """Inside shard_map: replicated values as per-device values (transpose: psum over 'data').

    Differentiating through it sums the gradients of replicated params explicitly, as the
    implicit cast would, and lets custom_vjp rules (blocks.depthwise_conv3x3) see kernels that
    vary over devices like the cotangents they return.
    """
    return jax.lax.pcast(tree, DATA_AXIS, to="varying")


def data_parallel_step(step_fn: Callable, mesh: Mesh, num_args: int) -> Callable:
    """jit(shard_map(step_fn)) with the last argument (the batch) split over 'data'.

    Every other argument and every output is replicated; argument 0 (the train state) is
    donated. step_fn must differentiate `global_mean(local loss)` with respect to
    `device_varying(params)`: under shard_map's replication checking the gradient of a
    replicated parameter comes back already summed over devices, so the 1/N of the mean makes
    it the global-batch gradient. A further pmean of the gradients would be a bug (N x too
    large; AdamW hides it, SGD does not).
    """
    in_specs = (PartitionSpec(),) * (num_args - 1) + (PartitionSpec(DATA_AXIS),)
    mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())
    return jax.jit(mapped, donate_argnums=0)
