"""Mesh and batch sharding on the 4 fake CPU devices."""

import jax
import jax.numpy as jnp
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


def _sgd_step(state, batch):
    """A linear least-squares SGD step written as dtpf_jax.train writes its steps."""

    def loss_fn(w):
        w = parallel.device_varying(w)
        return parallel.global_mean(jnp.mean((batch["x"] @ w - batch["y"]) ** 2))

    loss, grad = jax.value_and_grad(loss_fn)(state["w"])
    return {"w": state["w"] - 0.1 * grad}, {"loss": loss, "grad": grad}


def test_data_parallel_step_gives_the_global_batch_gradient_once():
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 3)).astype(np.float32)}
    batch["y"] = (batch["x"] @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    w0 = np.zeros(3, np.float32)
    want_grad = np.asarray(jax.grad(lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(w0))
    for n in (4, 1):
        mesh = parallel.make_mesh(jax.devices()[:n])
        step = parallel.data_parallel_step(_sgd_step, mesh, num_args=2)
        state = {"w": parallel.replicate(w0, mesh)}
        new, m = step(state, parallel.shard_batch(batch, mesh))
        # Summed over devices once by the transpose of device_varying, divided once by the mean.
        np.testing.assert_allclose(np.asarray(m["grad"]), want_grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new["w"]), w0 - 0.1 * want_grad, rtol=1e-5)
        assert state["w"].is_deleted()  # the state is donated
        assert new["w"].sharding.spec == PartitionSpec()
