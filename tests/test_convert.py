"""scripts/convert_official.py: official state dicts -> our weight files, and back."""

import importlib.util
import pathlib

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dtpf_jax import checkpoint, fuse, official
from dtpf_jax.images import read_image, write_png_atomic

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_official.py"
_spec = importlib.util.spec_from_file_location("convert_official", SCRIPT)
co = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(co)


def _rows(shared_dir, kind):
    path = shared_dir / "official_keys" / f"{kind}_state_dict.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return official.read_keys_tsv(path)


def _random_state_dict(rows, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in rows}


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_every_tensor_lands_where_the_mapping_says_and_round_trips(kind, shared_dir):
    rows = _rows(shared_dir, kind)
    sd = _random_state_dict(rows)
    clip = {"model_clip.text_projection": np.zeros((512, 512), np.float32)}
    params, got_kind, n_clip = co.state_dict_to_params(sd | clip)
    assert (got_kind, n_clip) == (kind, 1)
    flat = flatten_dict(params)
    assert len(flat) == len(rows)
    for name, _ in rows:
        np.testing.assert_array_equal(
            flat[official.flax_path(name)], official.to_flax(name, sd[name]), err_msg=name
        )
    back = co.params_to_state_dict(params, rows)
    assert set(back) == set(sd)
    for name in sd:
        np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def test_converted_file_loads_and_fuses(shared_dir, tmp_path, capsys):
    rows = _rows(shared_dir, "student")
    sd = _random_state_dict(rows, seed=1)
    src = tmp_path / "distill.npz"
    np.savez(src, **{f"module.{k}": v for k, v in sd.items()})  # a DataParallel-style prefix
    keys = shared_dir / "official_keys"
    assert co.main([str(src), str(tmp_path / "student.msgpack"), "--keys", str(keys)]) == 0
    summary = capsys.readouterr().out
    assert "official student, 644 tensors, 4,371,772 values" in summary
    assert "names checked against" in summary
    params, cfg, meta = checkpoint.load_params(tmp_path / "student.msgpack")
    assert cfg.dim == 16 and meta["kind"] == "student" and "do not redistribute" in meta["source"]
    vis = (np.random.default_rng(0).random((50, 60, 3)) * 255).astype(np.uint8)
    ir = (np.random.default_rng(1).random((50, 60)) * 255).astype(np.uint8)
    for sub, img in (("vis", vis), ("ir", ir)):
        (tmp_path / sub).mkdir()
        write_png_atomic(tmp_path / sub / "x.png", img)
    argv = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--out"]
    argv += [str(tmp_path / "out"), "--weights", str(tmp_path / "student.msgpack"), "--quiet"]
    assert fuse.main(argv) == 0, capsys.readouterr().err
    assert np.asarray(read_image(tmp_path / "out" / "x.png", "RGB")).shape == (50, 60, 3)


def test_teacher_converts_with_the_official_film(shared_dir):
    params, kind, _ = co.state_dict_to_params(_random_state_dict(_rows(shared_dir, "teacher")))
    assert kind == "teacher" and co.model_config(kind).film_form == "official"
    checkpoint.check_params(params, co.model_config(kind))


def test_problems_are_reported_in_one_line(shared_dir, tmp_path):
    rows = _rows(shared_dir, "student")
    sd = _random_state_dict(rows)
    first = rows[0][0]
    bad = {k: v for k, v in sd.items() if k != first} | {"encoder_A.bogus.weight": np.zeros(3)}
    with pytest.raises(
        co.ConversionError,
        match=r"1 unknown names \(encoder_A.bogus.weight\), "
        r"1 missing",
    ) as e:
        co.state_dict_to_params(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(co.ConversionError, match="1 of another shape"):
        co.check_keys(sd | {first: np.zeros((1, 2))}, rows)
    with pytest.raises(co.ConversionError, match="several networks"):
        co.strip_prefix({f"student.{first}": 0, f"teacher.{first}": 0})
    with pytest.raises(co.ConversionError, match="not a DTPF"):
        co.strip_prefix({"fc.weight": 0})
    assert co.strip_prefix({f"model.{first}": 1, "epoch": 2}) == {first: 1}
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"not a checkpoint")
    assert co.main([str(pth), str(tmp_path / "y.msgpack")]) == 2
    assert not (tmp_path / "y.msgpack").exists()


def test_pth_files_with_torch(shared_dir, tmp_path):
    torch = pytest.importorskip("torch")
    rows = _rows(shared_dir, "student")
    sd = _random_state_dict(rows)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "s.pth")
    co.convert(tmp_path / "s.pth", tmp_path / "s.msgpack", shared_dir / "official_keys")
    params, _, _ = checkpoint.load_params(tmp_path / "s.msgpack")
    back = co.params_to_state_dict(params, rows)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
