import jax
import numpy as np
import pytest

from dtpf_jax import checkpoint, parallel


def test_params_round_trip_with_config_and_meta(tmp_path, tiny_student):
    cfg, params = tiny_student
    path = tmp_path / "w" / "student.msgpack"
    sha = checkpoint.save_params(path, params, cfg, {"stage": "distill", "step": 7})
    assert sha == checkpoint.file_sha256(path)
    got, got_cfg, meta = checkpoint.load_params(path)
    assert got_cfg.to_dict() == cfg.to_dict()
    assert meta == {"stage": "distill", "step": 7}
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path, tiny_student):
    cfg, params = tiny_student
    full, half = tmp_path / "f32.msgpack", tmp_path / "f16.msgpack"
    checkpoint.save_params(full, params, cfg)
    checkpoint.save_params(half, params, cfg, dtype="float16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    got = checkpoint.load_params(half)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="storage dtype"):
        checkpoint.save_params(tmp_path / "x.msgpack", params, cfg, dtype="int8")


def test_wrong_network_missing_and_garbage_files(tmp_path, tiny_student):
    cfg, params = tiny_student
    other = cfg.copy_and_resolve_references()
    other.dim = 16
    path = tmp_path / "mislabelled.msgpack"
    checkpoint.save_params(path, params, other)
    with pytest.raises(checkpoint.WeightsError, match="another network"):
        checkpoint.load_params(path)
    with pytest.raises(checkpoint.WeightsError, match="not found"):
        checkpoint.load_params(tmp_path / "nope.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.WeightsError, match="cannot read"):
        checkpoint.load_params(tmp_path / "junk.msgpack")


def test_train_manager_keeps_the_best_k_by_quality_and_the_latest(tmp_path):
    mesh = parallel.make_mesh()
    state = {
        "step": parallel.replicate(np.int32(0), mesh),
        "w": parallel.replicate(np.ones(3), mesh),
    }
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    mngr = checkpoint.train_manager(tmp_path, keep_best=2)
    qualities = {1: 0.5, 2: None, 3: 0.9, 4: 0.7, 5: None, 6: 0.6, 7: None}
    for step, q in qualities.items():
        state = {"step": parallel.replicate(np.int32(step), mesh), "w": state["w"]}
        checkpoint.save_train_state(mngr, step, state, quality=q)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [3, 4, 7]  # best two by quality + the latest
    assert checkpoint.select_step(mngr) == 3 and checkpoint.select_step(mngr, 7) == 7
    got = checkpoint.restore_train_state(mngr, 4, abstract)
    assert int(got["step"]) == 4 and got["w"].sharding == state["w"].sharding
    with pytest.raises(checkpoint.WeightsError, match="no step 2"):
        checkpoint.select_step(mngr, 2)
    mngr.close()
    with pytest.raises(checkpoint.WeightsError, match="no checkpoints"):
        checkpoint.select_step(checkpoint.train_manager(tmp_path / "empty"))
