"""The library API: `from dtpf_jax import load_model, fuse_images` on numpy and PIL inputs."""

import logging
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from dtpf_jax import checkpoint, color, infer


@pytest.fixture(scope="module")
def student(tiny_student):
    cfg, params = tiny_student
    return infer.Model(params, cfg, "tiny student")


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    cfg, params = tiny_teacher
    return infer.Model(params, cfg, "tiny teacher")


def _pair(h=40, w=52):
    rng = np.random.default_rng(0)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8), (rng.random((h, w)) * 255).astype(
        np.uint8
    )


def test_import_is_cheap_and_exports_the_api():
    code = "import sys, dtpf_jax; assert 'jax' not in sys.modules; print(dtpf_jax.__all__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from dtpf_jax import fuse_images, load_model

    assert fuse_images is infer.fuse_images and load_model is infer.load_model


def test_numpy_pil_and_float_inputs_agree(student):
    vis, ir = _pair()
    out = infer.fuse_images(vis, ir, student)
    assert out.dtype == np.uint8 and out.shape == (40, 52, 3)
    pil = infer.fuse_images(Image.fromarray(vis), Image.fromarray(ir), student)
    assert isinstance(pil, Image.Image) and pil.size == (52, 40) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil), out)
    flt = infer.fuse_images(vis / 255.0, ir / 255.0, student)
    assert flt.dtype == np.float32 and 0 <= flt.min() and flt.max() <= 1
    np.testing.assert_allclose(flt * 255, out, atol=0.51)
    # 16-bit arrays, RGB infrared (as luma), gray visible and a 4-D batch all go through.
    u16 = infer.fuse_images(vis.astype(np.uint16) * 257, np.stack([ir] * 3, -1), student)
    np.testing.assert_allclose(u16.astype(int), out.astype(int), atol=2)
    assert infer.fuse_images(ir, ir, student).shape == (40, 52, 3)
    batch = infer.fuse_images(vis[None], ir[None, ..., None], student)  # batch shape, 1 compile
    assert batch.shape == (1, 40, 52, 3)
    np.testing.assert_array_equal(batch[0], out)


def test_colors_and_modes(student):
    vis, ir = _pair()
    rgb = infer.fuse_images(vis, ir, student, color="rgb") / 255.0
    gray = infer.fuse_images(vis, ir, student, color="gray")
    assert gray.shape == (40, 52)
    # each side rounds to 8 bits once
    np.testing.assert_allclose(gray, color.rgb_to_gray(rgb)[..., 0] * 255, atol=1.01)
    ycc = infer.fuse_images(vis / 255.0, ir / 255.0, student, color="ycbcr")
    kept = ((ycc > 0) & (ycc < 1)).all(-1)  # out-of-gamut pixels are clipped, chroma and all
    assert kept.mean() > 0.5
    np.testing.assert_allclose(
        color.rgb_to_ycbcr(ycc)[kept][:, 1:],
        color.rgb_to_ycbcr(vis / 255.0)[kept][:, 1:],
        atol=1e-5,
    )
    assert infer.pick_mode("auto", 100, 100, threshold=5000) == "large"
    assert infer.pick_mode("auto", 100, 100, threshold=0) == "full"
    assert infer.pick_mode("auto", 10, 10, threshold=5000) == "full"
    with pytest.raises(ValueError, match="unknown color"):
        infer.fuse_images(vis, ir, student, color="lab")
    with pytest.raises(ValueError, match="divide 8-bit values by 255"):
        infer.fuse_images(vis.astype(np.float32), ir, student)
    with pytest.raises(ValueError, match="sizes differ"):
        infer.fuse_images(vis, ir[:-1], student)


def test_bad_arrays_say_what_was_passed_and_a_path_is_opened(student, tmp_path):
    vis, ir = _pair()
    nan = vis / 255.0
    nan[3, 4, 1] = np.nan
    cases = [  # refused before anything runs: a NaN would give an all-NaN image
        ((nan, ir), ValueError, "vis: 1 of 6240 values are NaN or infinite"),
        ((vis, np.full((40, 52), np.inf)), ValueError, "ir: 2080 of 2080 values are NaN or inf"),
        ((np.zeros((0, 0)), ir), ValueError, r"vis: an empty image, shape \(0, 0\)"),
        ((None, ir), TypeError, "vis: got NoneType; pass a PIL image, an image file's path"),
        ((vis, [["a"]]), TypeError, "ir: got an array of dtype <U1; pass a PIL image"),
        (("no_such.png", ir), FileNotFoundError, "no_such.png"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            infer.fuse_images(*args, student)
    Image.fromarray(vis).save(tmp_path / "v.png")
    Image.fromarray(ir).save(tmp_path / "i.png")
    opened = infer.fuse_images(str(tmp_path / "v.png"), tmp_path / "i.png", student)
    assert isinstance(opened, Image.Image)
    np.testing.assert_array_equal(np.asarray(opened), infer.fuse_images(vis, ir, student))


def test_text_rules(student, teacher):
    vis, ir = _pair()
    with pytest.raises(ValueError, match="text-free"):
        infer.fuse_images(vis, ir, student, text="Event Type: Low Light")
    with pytest.raises(ValueError, match="text-guided"):
        infer.fuse_images(vis, ir, teacher)
    emb = np.random.default_rng(0).normal(size=512).astype(np.float32)
    a = infer.fuse_images(vis, ir, teacher, text=emb)
    b = infer.fuse_images(vis, ir, teacher, text=-emb)
    assert a.shape == (40, 52, 3) and not np.array_equal(a, b)


def test_load_model_resolution(tmp_path, tiny_student, monkeypatch, caplog):
    cfg, params = tiny_student
    monkeypatch.setattr(infer, "WEIGHTS_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, "dtpf_jax"):
        untrained = infer.load_model("student")
    assert not untrained.trained and infer.UNTRAINED_WARNING in caplog.text
    checkpoint.save_params(tmp_path / infer.DEFAULT_STUDENT, params, cfg, {"stage": "distill"})
    caplog.clear()
    shipped = infer.load_model("student")
    assert shipped.trained and shipped.meta == {"stage": "distill"} and not caplog.text
    assert shipped.config.dim == cfg.dim
    assert infer.load_model(tmp_path / infer.DEFAULT_STUDENT, "bfloat16").config.dtype == "bfloat16"
    with pytest.raises(checkpoint.WeightsError, match="no teacher weights ship"):
        infer.load_model("teacher")
    # A medical student's name never falls back to an untrained network: it must ship.
    with pytest.raises(checkpoint.WeightsError, match="student_ct_mri: .* missing from this"):
        infer.load_model("student_ct_mri")
    checkpoint.save_params(tmp_path / "student_ct_mri.msgpack", params, cfg, {"stage": "student"})
    ct = infer.load_model("student_ct_mri")
    assert ct.trained and ct.source == str(tmp_path / "student_ct_mri.msgpack")
    assert infer.load_model("student_ivf").source == shipped.source
    with pytest.raises(checkpoint.WeightsError, match="student_pet: neither a shipped student"):
        infer.load_model("student_pet")
    with pytest.raises(checkpoint.WeightsError, match="not found"):
        infer.load_model(tmp_path / "missing.msgpack")


def test_random_params_fit_the_network_with_torch_init_bounds(tiny_student):
    cfg, _ = tiny_student
    params = infer.random_params(cfg, seed=3)
    checkpoint.check_params(params, cfg)  # exactly the network's tensors and shapes
    for path, v in flatten_dict(params).items():
        assert v.dtype == np.float32
        if path[-1] == "kernel" and v.ndim == 4:  # (3, 3, in, out): U(+-1/sqrt(9 in))
            assert np.abs(v).max() <= 1 / np.sqrt(9 * v.shape[2]) + 1e-7
        if path[-1] in ("weight", "temperature"):
            assert (v == 1).all()
