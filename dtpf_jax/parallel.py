"""Data parallelism: the 1-D 'data' mesh over every device and batch sharding along it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """1-D mesh with axis 'data' over all devices of all processes (process-major order)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


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
