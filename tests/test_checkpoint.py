import jax
import numpy as np
import pytest

from dtpf_jax import checkpoint


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
