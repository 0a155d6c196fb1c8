"""The fuse CLI: folders in, same-size PNGs out; every bad input is one `error:` line."""

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, tiny_model_config
from PIL import Image

from dtpf_jax import checkpoint, demo, fuse, images, infer, metrics, plan

H, W = 40, 52  # bucket 64x64: one compile for every case below


@pytest.fixture(scope="session")
def weights(tmp_path_factory, tiny_student, tiny_teacher):
    """Tiny student and teacher files, student params under a teacher config, garbage."""
    d = tmp_path_factory.mktemp("weights")
    checkpoint.save_params(d / "student.msgpack", tiny_student[1], tiny_student[0])
    checkpoint.save_params(d / "teacher.msgpack", tiny_teacher[1], tiny_teacher[0])
    checkpoint.save_params(d / "wrong.msgpack", tiny_student[1], tiny_model_config("teacher"))
    (d / "garbage.msgpack").write_bytes(b"\x93not msgpack at all")
    return d


def _vis(h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _ir(h=H, w=W, seed=1):
    return (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _good(root, names=("a",)):
    for n in names:
        _save(root / "vis" / f"{n}.png", _vis())
        _save(root / "ir" / f"{n}.png", _ir())


# Each case: builder(root) -> extra argv, expected exit status, text expected on stderr.
def case_unmatched(root):
    _good(root, ("a", "b"))
    (root / "ir" / "b.png").unlink()
    return [], 2, "missing in"


def case_size_mismatch(root):
    _good(root, ("a", "b"))
    _save(root / "ir" / "b.png", _ir(H, W - 2))
    return [], 2, "differs from"


def case_16bit(root):
    _good(root)
    ir16 = Image.fromarray(_ir().astype(np.uint16) * 257)
    assert ir16.mode == "I;16"
    ir16.save(root / "ir" / "a.png")
    return [], 0, ""


def case_palette(root):
    _good(root)
    Image.fromarray(_vis()).convert("P").save(root / "vis" / "a.png")
    return [], 0, ""


def case_rgba(root):
    _good(root)
    Image.fromarray(_vis()).convert("RGBA").save(root / "vis" / "a.png")
    return [], 0, ""


def case_gray_as_rgb(root):
    _good(root)
    ir = _ir()
    _save(root / "ir" / "a.png", np.stack([ir] * 3, -1))  # IR stored as RGB with R=G=B
    _save(root / "vis" / "a.png", _ir(seed=5))  # visible stored as gray
    return [], 0, ""


def case_corrupt(root):
    _good(root, ("a", "b"))
    data = (root / "vis" / "b.png").read_bytes()
    (root / "vis" / "b.png").write_bytes(data[: len(data) // 2])
    return [], 2, "corrupt"


def case_not_an_image(root):
    _good(root)
    (root / "vis" / "b.png").write_text("hello, I am a text file")
    _save(root / "ir" / "b.png", _ir())
    return [], 2, "not an image"


def case_empty_folder(root):
    (root / "vis").mkdir()
    (root / "ir").mkdir()
    return [], 2, "no images"


def case_missing_out(root):
    _good(root)
    return ["--out", str(root / "new" / "deeper")], 0, ""


def case_unwritable_out(root):
    _good(root)
    (root / "file.txt").write_text("a regular file")
    return ["--out", str(root / "file.txt" / "sub")], 2, "cannot write"


def case_huge(root):  # auto runs it as one large tile of 128², the shape test_infer compiles
    _save(root / "vis" / "a.png", _vis(100, 120))
    _save(root / "ir" / "a.png", _ir(100, 120))
    return ["--max-full-pixels", "10000", "--tile-batch", "2"], 0, ""


def case_huge_two_passes(root):  # the large tile twice, the second on the frame's statistics
    _save(root / "vis" / "a.png", _vis(100, 120))
    _save(root / "ir" / "a.png", _ir(100, 120))
    return ["--max-full-pixels", "10000", "--large-passes", "2"], 0, ""


def case_weights_missing(root):
    _good(root)
    return ["--weights", str(root / "nope.msgpack")], 2, "not found"


def case_weights_wrong_network(root):
    _good(root)
    return ["--weights", "WEIGHTS/wrong.msgpack"], 2, "another network"


def case_weights_garbage(root):
    _good(root)
    return ["--weights", "WEIGHTS/garbage.msgpack"], 2, "cannot read weights"


def case_teacher_without_text(root):
    _good(root)
    return ["--weights", "WEIGHTS/teacher.msgpack"], 2, "needs a caption"


def case_student_with_text(root):
    _good(root)
    return ["--text", "Event Type: Low Light"], 2, "text-free"


def case_out_is_an_input(root):
    _good(root)
    return ["--out", str(root / "vis")], 2, "is an input folder"


def case_recursive_out_in_an_input(root):
    _good(root)
    return ["--recursive", "--out", str(root / "vis" / "fused")], 2, "inside the input folder"


def case_no_teacher_ships(root):
    _good(root)
    return ["--weights", "teacher"], 2, "no teacher weights ship"


def case_html_is_an_input(root):
    _good(root)
    return ["--html", str(root / "vis" / "a.png")], 2, "is an input image (--vis)"


def case_html_is_an_output(root):
    _good(root)
    return ["--html", str(root / "out" / "a.png")], 2, "where the fused image of a goes"


def case_html_is_a_folder(root):
    _good(root)
    (root / "pages").mkdir()
    return ["--html", str(root / "pages")], 2, "is a folder"


def case_html_under_a_file(root):
    _good(root)
    (root / "file.txt").write_text("a regular file")
    return ["--html", str(root / "file.txt" / "p.html")], 2, "is a file, not a folder"


CASES = [v for k, v in dict(globals()).items() if k.startswith("case_")]


def _digest(root: pathlib.Path) -> dict:
    """sha256 of every input file (the vis and ir folders)."""
    files = [p for d in ("vis", "ir") for p in sorted((root / d).rglob("*")) if p.is_file()]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[5:])
def test_bad_input_matrix(case, tmp_path, weights, capsys):
    extra, want_rc, want_err = case(tmp_path)
    extra = [str(weights / a[8:]) if a.startswith("WEIGHTS/") else a for a in extra]
    argv = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--quiet"]
    argv += ["--out", str(tmp_path / "out")] if "--out" not in extra else []
    argv += [] if "--weights" in extra else ["--weights", str(weights / "student.msgpack")]
    before = _digest(tmp_path)
    rc = fuse.main(argv + extra)
    captured = capsys.readouterr()
    assert rc == want_rc, captured.err
    assert _digest(tmp_path) == before, "an input was modified"
    argv += extra
    out = pathlib.Path(argv[argv.index("--out") + 1])  # only one --out is passed
    if want_rc:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert want_err in lines[0]
        assert "Traceback" not in captured.err
        assert not (out.is_dir() and out != tmp_path / "vis" and any(out.iterdir()))
        return
    assert captured.err == ""
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["a.png"]  # no temp files left behind
    with Image.open(written[0]) as img:
        h, w = read_size(tmp_path / "vis")
        assert img.mode == "RGB" and img.size == (w, h)
    done = [line for line in captured.out.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and done[0].startswith(("done: 1 image in", "done: 1 image, "))
    if case in (case_huge, case_huge_two_passes):
        assert "note: 1 image above" in captured.out and "large mode" in captured.out
        assert "1 in large tiles" in captured.out and "128² tiles" not in captured.out


def read_size(folder: pathlib.Path) -> tuple[int, int]:
    with Image.open(next(folder.iterdir())) as img:
        return img.size[1], img.size[0]


def test_colors_files_and_html(tmp_path, weights, capsys):
    _good(tmp_path)
    vis, ir = tmp_path / "vis" / "a.png", tmp_path / "ir" / "a.png"
    base = ["--vis", str(vis), "--ir", str(ir), "--weights", str(weights / "student.msgpack")]
    outs, page_path = {}, tmp_path / "new" / "deeper" / "p.html"  # folders made as needed
    for color in ("rgb", "ycbcr", "gray"):
        args = base + ["--out", str(tmp_path / color), "--color", color, "--quiet"]
        assert fuse.main(args + (["--html", str(page_path)] if color == "rgb" else [])) == 0
        with Image.open(tmp_path / color / "a.png") as img:  # named after the visible file
            outs[color] = (img.mode, np.asarray(img))
    assert outs["rgb"][0] == outs["ycbcr"][0] == "RGB" and outs["gray"][0] == "L"
    assert outs["gray"][1].shape == (H, W)
    rgb = outs["rgb"][1] / 255.0
    from dtpf_jax import color

    luma = color.rgb_to_gray(rgb)[..., 0] * 255
    np.testing.assert_allclose(outs["gray"][1], luma, atol=1.01)  # both rounded to 8 bits
    ycc = outs["ycbcr"][1]
    kept = ((ycc > 0) & (ycc < 255)).all(-1)  # out-of-gamut pixels are clipped, chroma and all
    chroma = color.rgb_to_ycbcr(ycc / 255.0)[kept][:, 1:]
    want = color.rgb_to_ycbcr(_vis() / 255.0)[kept][:, 1:]
    np.testing.assert_allclose(chroma, want, atol=0.01)  # 8-bit rounding
    page = page_path.read_text()
    assert "<title>DTPF fusion: student.msgpack</title>" in page  # a name, not the install's path
    assert page.count("data:image/png;base64") == 3
    capsys.readouterr()


def test_teacher_text_and_captions_change_the_output(tmp_path, weights, capsys):
    from dtpf_jax import captions, text

    clip = text.make_random_clip(tmp_path / "clip", seed=0)
    _good(tmp_path, ("a", "b"))
    base = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--quiet"]
    base += ["--weights", str(weights / "teacher.msgpack"), "--clip", str(clip)]
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "a.txt").write_text("Event Type: Low Light\nDescription: dark.\n")
    (caps / "b.txt").write_text("Event Type: Overexposure\nDescription: bright.\n")
    low = captions.clip_string(captions.parse_caption((caps / "a.txt").read_text()))[0]
    runs = {
        "low": ["--text", low],
        "noise": ["--text", "Event Type: IR Noise"],
        "caps": ["--captions", str(caps)],
    }
    got = {}
    for key, extra in runs.items():
        assert fuse.main(base + extra + ["--out", str(tmp_path / key)]) == 0, capsys.readouterr()
        got[key] = [np.asarray(Image.open(tmp_path / key / f"{n}.png")) for n in "ab"]
    assert not np.array_equal(got["low"][0], got["noise"][0])  # the text reaches the network
    assert np.array_equal(got["caps"][0], got["low"][0])  # a.txt is the same low-light record
    (caps / "b.txt").unlink()
    assert fuse.main(base + ["--captions", str(caps), "--out", str(tmp_path / "x")]) == 2
    assert "no caption file for 1 pairs (b)" in capsys.readouterr().err
    # --keep-going: the pair without a caption is skipped and said, the other one fused
    kept = ["--captions", str(caps), "--keep-going", "--out", str(tmp_path / "k")]
    page = tmp_path / "k.html"
    assert fuse.main(base + kept + ["--html", str(page)]) == 1
    err = capsys.readouterr().err
    assert "skipped: b: no caption file in" in err and "skipped: 1 pair" in err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k" / "a.png")), got["low"][0])
    html = page.read_text()  # the page shows the fused pair only
    assert not (tmp_path / "k" / "b.png").exists() and html.count("<tr><td>") == 1
    assert "<td>a</td>" in html and "<td>b</td>" not in html
    (caps / "a.txt").unlink()  # none left to fuse: an error, not an empty success
    assert fuse.main(base + kept) == 2
    assert "nothing to fuse: all 2 pairs were skipped" in capsys.readouterr().err
    assert fuse.main(base + ["--text", "x", "--clip", str(tmp_path / "no_clip"), "--out", "y"]) == 2
    assert "cannot load CLIP" in capsys.readouterr().err


def test_untrained_default_student_says_so(monkeypatch, caplog):
    monkeypatch.setattr(infer, "WEIGHTS_DIR", pathlib.Path("/nonexistent"))
    model = infer.load_model("student")
    assert not model.trained and infer.UNTRAINED_WARNING in caplog.text
    assert model.config.dim == 16  # the official student, randomly initialised


def test_medical_folder_with_the_ivf_student_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(infer, "WEIGHTS_DIR", tmp_path / "weights")
    jobs = lambda folder: [
        plan.Job("a", tmp_path / folder / "a.png", tmp_path / "mri" / "a.png", tmp_path)
    ]
    assert plan.medical_hint(jobs("PET"), "student") is None  # its student does not ship here
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "student_pet_mri.msgpack").touch()
    hint = plan.medical_hint(jobs("PET"), "student")
    assert hint and "--weights student_pet_mri" in hint and str(tmp_path / "PET") in hint
    assert plan.medical_hint(jobs("PET"), "student_pet_mri") is None  # already the right one
    assert plan.medical_hint(jobs("PET"), "my.msgpack") is None  # the user's own file
    assert plan.medical_hint(jobs("vi"), "student") is None
    assert plan.medical_hint(jobs("spect"), "student") is None  # SPECT's file is absent


def _run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "dtpf_jax.fuse", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        timeout=600,
    )


def test_bad_input_in_a_fresh_process_is_one_line(tmp_path):
    r = _run(["--vis", "nope", "--ir", "nope", "--out", "o"], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: nope: no such file") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_no_arguments_runs_the_builtin_demo(tmp_path):
    """The README's main command on a fresh folder: demo pair, fused PNG and an HTML page that
    say what was done, with max(vis, ir) beside the fused image and the scores of both."""
    r = _run([], tmp_path, DTPF_JAX_CACHE=str(REPO / ".cache" / "jax"))
    assert r.returncode == 0, r.stderr
    shipped = (infer.WEIGHTS_DIR / infer.DEFAULT_STUDENT).is_file()
    assert "Traceback" not in r.stderr and (infer.UNTRAINED_WARNING in r.stderr) != shipped
    folder = tmp_path / fuse.DEMO_DIR
    with Image.open(folder / "fused" / "street.png") as img:
        assert img.mode == "RGB" and img.size == demo.DEMO_SIZE[::-1]
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64") == 4  # vis | ir | max(vis, ir) | fused
    title = page.split("<title>")[1].split("</title>")[0]
    assert title == "DTPF demo" and str(tmp_path) not in page and "<p></p>" not in page
    for what in ("built-in synthetic pair", "the shipped student" if shipped else "untrained"):
        assert what in page and what in r.stdout
    # The scores printed and shown are those of the files written.
    vis, ir = (
        images.read_image(folder / d / "street.png", m) for d, m in (("vis", "RGB"), ("ir", "L"))
    )
    fused = images.read_image(folder / "fused" / "street.png", "RGB")
    for key, img in (("fused", fused), ("max(vis, ir)", np.maximum(vis, ir[..., None]))):
        s = metrics.evaluate_pair(img, vis, ir, "clean", ("VIF", "Qabf", "IRT"))
        line = f"VIF {s['VIF']:.3f}  Qabf {s['Qabf']:.3f}  IRT {s['IRT']:.3f}"
        assert re.search(rf"{re.escape(key)} +{line}", r.stdout) and line in page, r.stdout
    assert "done: 1 image in" in r.stdout and str(folder / "fused") in r.stdout
    assert "images/s" not in r.stdout.splitlines()[-1]  # no rate after compile from one image


@pytest.mark.parametrize("flag, picked", [(None, "fine"), ("coarse", "coarse")])
def test_buckets_auto_picks_fine_for_one_size(tmp_path, weights, capsys, flag, picked):
    for n in ("a", "b"):  # 40x70: fine bucket 64x96, coarse 64x128
        _save(tmp_path / "vis" / f"{n}.png", _vis(40, 70))
        _save(tmp_path / "ir" / f"{n}.png", _ir(40, 70))
    args = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--quiet"]
    args += ["--out", str(tmp_path / "out"), "--weights", str(weights / "student.msgpack")]
    assert fuse.main(args + (["--buckets", flag] if flag else [])) == 0
    assert f"({picked} buckets)" in capsys.readouterr().out
    for n in ("a", "b"):
        with Image.open(tmp_path / "out" / f"{n}.png") as img:
            assert img.size == (70, 40)


def test_recursive_keep_going_then_skip_existing(tmp_path, weights, capsys):
    """A tree with an unmatched name, a corrupt file and a size mismatch: --keep-going fuses the
    good pairs into mirrored subfolders and lists the rest (exit 1); --skip-existing then keeps
    complete outputs and redoes a truncated one."""
    names = ("a", "day/b", "day/c", "night/d", "night/e")
    _good(tmp_path, names)
    (tmp_path / "ir" / "day" / "c.png").unlink()
    (tmp_path / "vis" / "night" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _save(tmp_path / "ir" / "night" / "e.png", _ir(H, W - 2))
    out = tmp_path / "out"
    args = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--out", str(out)]
    args += ["--weights", str(weights / "student.msgpack"), "--quiet", "--recursive"]
    assert fuse.main(args) == 2  # strict by default: nothing written
    assert "missing in" in capsys.readouterr().err and not out.exists()
    assert fuse.main(args + ["--keep-going"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("skipped: day/c: missing in ") and err[0].endswith("ir (ir)")
    assert err[1].startswith("skipped: night/d: ") and "cannot decode" in err[1]
    assert err[2].startswith("skipped: night/e: ") and "differs from" in err[2]
    assert err[3:] == ["skipped: 3 pairs (listed above)"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "day/b.png"]
    first = (out / "day" / "b.png").read_bytes()
    # An output kept (a sentinel of the right size) and one cut short, as by a crash.
    _save(out / "a.png", np.zeros((H, W, 3), np.uint8))
    (out / "day" / "b.png").write_bytes(first[: len(first) // 2])
    assert fuse.main(args + ["--keep-going", "--skip-existing"]) == 1
    captured = capsys.readouterr()
    assert "1 done before and kept (--skip-existing)" in captured.out, captured.out
    assert "done: 1 image in" in captured.out
    assert not np.asarray(Image.open(out / "a.png")).any()  # not recomputed
    assert (out / "day" / "b.png").read_bytes() == first  # redone, the same as before


def test_bits_16_keeps_a_16_bit_infrared(tmp_path, weights, tiny_student, capsys):
    """A 16-bit thermal image (counts 20000-40000) in, a 16-bit PNG out: every level reaches the
    network (the values over 0-65535, as fuse_images takes a uint16 array) and the output."""
    vis = _vis()
    ir16 = (20000 + np.random.default_rng(3).random((H, W)) * 20000).astype(np.uint16)
    _save(tmp_path / "v.png", vis)
    Image.fromarray(ir16).save(tmp_path / "i.png")
    args = ["--vis", str(tmp_path / "v.png"), "--ir", str(tmp_path / "i.png"), "--quiet"]
    args += ["--out", str(tmp_path / "out"), "--weights", str(weights / "student.msgpack")]
    assert fuse.main(args + ["--bits", "16", "--color", "gray"]) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "v.png") as img:
        assert img.mode == "I;16" and img.size == (W, H)
        got = np.asarray(img).astype(np.int64)
    model = infer.Model(tiny_student[1], tiny_student[0], "tiny student")
    want = infer.fuse_images(vis / 255.0, ir16 / 65535.0, model, color="gray") * 65535.0
    assert np.abs(got - want).max() <= 1.0
    coarse = infer.fuse_images(vis / 255.0, np.round(ir16 / 257) / 255, model, color="gray")
    # an 8-bit infrared would show: several times the 16-bit path's rounding (here 4.8 levels)
    assert np.abs(got - coarse * 65535).max() > 3 * max(1.0, np.abs(got - want).max())
    # RGB at 16 bits: Pillow reads such a PNG at 8 bits, the high byte of each value.
    rgb16 = (np.random.default_rng(4).random((5, 7, 3)) * 65535).astype(np.uint16)
    images.write_png_atomic(tmp_path / "rgb16.png", rgb16)
    assert (tmp_path / "rgb16.png").read_bytes()[24:26] == bytes([16, 2])  # depth, truecolour
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb16.png")), rgb16 >> 8)


def test_compile_summary_counts_cache_loads_and_build_time_only(
    tmp_path, weights, tiny_student, capsys
):
    """A program loaded from the persistent cache is not a new shape, and in tiles mode only
    building the program counts as compile time, not the image's run (slowed here by 0.5 s)."""
    import re

    import jax

    vis, ir = _vis(100, 150), _ir(100, 150)
    _save(tmp_path / "vis" / "a.png", vis)
    _save(tmp_path / "ir" / "a.png", ir)
    args = ["--vis", str(tmp_path / "vis"), "--ir", str(tmp_path / "ir"), "--quiet"]
    args += ["--out", str(tmp_path / "out"), "--weights", str(weights / "student.msgpack")]
    args += ["--mode", "tiles", "--tile-batch", "2"]
    real_fuse_one, min_s = fuse._fuse_one, jax.config.jax_persistent_cache_min_compile_time_secs

    def slow_fuse_one(*a, **k):
        out = real_fuse_one(*a, **k)
        time.sleep(0.5)
        return out

    model = infer.Model(tiny_student[1], tiny_student[0], "tiny student")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:  # built now or in an earlier session: in the persistent cache either way
        model.fuser(model.params, vis / 255.0, ir / 255.0, mode="tiles", tile_batch=2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(infer, "_FUSERS", {})  # a fresh jit: the program is built once more
            mp.setattr(fuse, "_fuse_one", slow_fuse_one)
            assert fuse.main(args) == 0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("compile: 0 new shapes, 1 from the compile cache"), out
    build = float(re.search(r"buckets\), ([\d.]+) s", out[-2]).group(1))
    total = float(re.search(r"in ([\d.]+) s", out[-1]).group(1))
    assert total - build >= 0.4, out  # the 0.5 s, less the rounding to 0.1 s


def test_tile_bar_shows_tiles_done_of_total_and_the_time_left(monkeypatch, capsys):
    monkeypatch.setattr(fuse.TileBar, "DELAY_S", 0.0)
    with fuse.TileBar(disable=False) as bar:
        for done in (0, 1, 2, 3):
            bar(done, 3)
    err = capsys.readouterr().err
    assert re.search(r"tiles: +33%.* 1/3 \[\d\d:\d\d<\d\d:\d\d", err), err  # elapsed<left
    assert " 3/3 " in err
    with fuse.TileBar(disable=True) as bar:  # --quiet
        bar(1, 3)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("mode", "hint"),
    [("full", "--mode large"), ("large", "--mode tiles"), ("tiles", "--mode large")],
)
def test_out_of_memory_names_a_mode_with_less_memory(mode, hint, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate")

    monkeypatch.setattr(infer.Model, "fuser", property(lambda self: exhausted))
    model = infer.Model(params={}, config=tiny_model_config("student"), source="test")
    job = plan.Job("a", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out.png", (600, 800))
    with pytest.raises(
        fuse.DataError, match=rf"a\.png: out of memory at 800x600 in {mode} mode; use {hint}"
    ):
        fuse._fuse_one(job, model, None, None, None, mode, 16, "coarse")
