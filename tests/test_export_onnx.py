"""ONNX export of a student: onnxruntime on the exported file gives the JAX forward's output."""

import numpy as np
import onnxruntime as ort
import pytest

from dtpf_jax import checkpoint, export_onnx, infer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_student):
    """A tiny student's weight file exported through the CLI, and its onnxruntime session."""
    cfg, params = tiny_student
    d = tmp_path_factory.mktemp("onnx")
    checkpoint.save_params(d / "student.msgpack", params, cfg)
    assert export_onnx.main(["--weights", str(d / "student.msgpack"), str(d / "s.onnx")]) == 0
    return ort.InferenceSession(str(d / "s.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,h,w", [(1, 64, 96), (2, 64, 128)])
def test_onnxruntime_equals_the_jax_forward(exported, tiny_student, batch, h, w):
    # One file for every shape: batch, H and W are dynamic. 64x96 has a partial window at
    # level 4 (8x12); the shapes are those test_infer compiles.
    cfg, params = tiny_student
    rng = np.random.default_rng(h + w)
    vis = rng.random((batch, h, w, 3), np.float32)
    ir = rng.random((batch, h, w, 1), np.float32)
    want = np.asarray(infer.Fuser(cfg)._apply(params, vis, ir, None))  # clipped to [0, 1]
    (got,) = exported.run(None, {"vis": vis.transpose(0, 3, 1, 2), "ir": ir.transpose(0, 3, 1, 2)})
    assert got.shape == (batch, 3, h, w)
    # Most pixels lie inside (0, 1), so the clip hides little of the comparison.
    assert ((want > 0) & (want < 1)).mean() > 0.5
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), want, rtol=0, atol=1e-4)


def test_teacher_and_bad_weights_are_one_line_errors(tmp_path, tiny_teacher, capsys):
    cfg, params = tiny_teacher
    checkpoint.save_params(tmp_path / "teacher.msgpack", params, cfg)
    out = tmp_path / "t.onnx"
    assert export_onnx.main(["--weights", str(tmp_path / "teacher.msgpack"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "teacher" in err and err.count("\n") == 1
    assert export_onnx.main(["--weights", "studnet", str(out)]) == 2
    assert "neither a shipped student" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="CLIP text"):
        export_onnx.student_onnx(params, cfg)
