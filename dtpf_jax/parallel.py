"""Data parallelism: processes, the 1-D 'data' mesh, batch sharding, the shard_map step wrapper."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh with axis 'data' over `devices` (default: all of all processes, process-major)."""
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def init_processes(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = 100,
) -> None:
    """Join the other processes of a run: jax.distributed.initialize.

    What is not given is detected (SLURM, Open MPI, Kubernetes, Cloud TPU). With all three
    given, detection is off: it would also narrow each process to one GPU (SLURM: its
    SLURM_LOCALID), where one process per host should use them all. A process that dies is
    noticed by the others within heartbeat_timeout seconds; they stop with an error.
    """
    explicit = None not in (coordinator, num_processes, process_id)
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        cluster_detection_method="deactivate" if explicit else None,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    if jax.process_index() != 0:  # one log for the run: process 0's; warnings from all
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "process %d of %d: %d local devices, %d in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


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
    jitted = jax.jit(mapped, donate_argnums=0)
    return jitted if jax.process_count() == 1 else StartTogether(jitted)


class StartTogether:
    """A jitted function that, with several processes, runs for the first time only once every
    process has compiled it.

    CPU collectives (gloo) give the processes 30 s to meet at a program's first collective.
    A process that finds the program in the persistent compilation cache (on CPU only process
    0 writes it, under a key of its own) would get there minutes before one that compiles.
    """

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, None
        self.lower = jitted.lower

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            wait_for_all_processes("compiled a step")
        return self.compiled(*args)


_BARRIERS = itertools.count()


def wait_for_all_processes(what: str, timeout_s: int = 1800) -> None:
    """Return once every process has called this (the coordination service's barrier: no
    device program, no collective); every process must make the same calls in the same order.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    key = f"dtpf_jax {next(_BARRIERS)}: {what}"
    multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


def first_process_value(x: float) -> float:
    """Process 0's value of a host float, on every process (one collective: it waits for the
    steps dispatched before it)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.float32(x)))
