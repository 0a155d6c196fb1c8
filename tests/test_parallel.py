"""Mesh and batch sharding on the 4 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dtpf_jax import parallel


def test_make_mesh_spans_every_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.shape == (jax.device_count(),) == (4,)
    assert set(mesh.devices.tolist()) == set(jax.devices())


def test_shard_batch_splits_axis0_and_drops_strings():
    mesh = parallel.make_mesh()
    batch = {
        "vis": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
        "weights": np.ones((8, 5), np.float32),
        "name": np.array([f"n{i}" for i in range(8)]),
    }
    out = parallel.shard_batch(batch, mesh)
    assert set(out) == {"vis", "weights"}
    vis = out["vis"]
    assert vis.shape == (8, 2, 2, 3) and vis.sharding.spec == PartitionSpec("data")
    shards = sorted(vis.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape[0] for s in shards] == [2, 2, 2, 2]
    assert len({s.device for s in shards}) == 4
    np.testing.assert_array_equal(np.asarray(vis), batch["vis"])


def test_shard_batch_rejects_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match="multiple of"):
        parallel.shard_batch({"x": np.zeros((6, 3), np.float32)}, parallel.make_mesh())
