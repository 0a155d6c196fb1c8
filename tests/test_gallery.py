"""The gallery PNG: evaluate's --gallery, the demo's scenes and scripts/make_gallery.py."""

import importlib
import pathlib

import numpy as np
from PIL import Image
from test_evaluate import make_folders, run

from dtpf_jax import demo, evaluate
from dtpf_jax.images import read_image

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
PAD, LINE = evaluate.GALLERY_PAD, evaluate.GALLERY_LINE


def cell(page, row, col, h, w, side=256):
    """The thumbnail at (row, col) of a gallery whose rows hold h x w images (unshrunk)."""
    y = PAD + LINE + row * (h + LINE + PAD)
    x = PAD + col * (side + PAD)
    return page[y : y + h, x : x + w], page[y + h + 1 : y + h + LINE, x : x + side]


def test_gallery_layout_and_cells(tmp_path):
    methods = ("max_rule", "mean_rule")
    dirs = make_folders(tmp_path, methods=methods)  # 3 pairs of 48 x 56
    out = tmp_path / "fig" / "g.png"
    assert run(dirs, "--gallery", out, "--gallery-images", "2", methods=methods) == 0
    page = read_image(out, "RGB")
    assert page.shape == (PAD + LINE + 2 * (48 + LINE + PAD), PAD + 4 * (256 + PAD), 3)
    # row 2 is b02: its visible image, its infrared (gray as RGB) and each method's image,
    # at full size (thumbnails only ever shrink), in column order
    for col, path in enumerate(
        [dirs["vis"] / "b02.png", dirs["ir"] / "b02.bmp"] + [dirs[m] / "b02.png" for m in methods]
    ):
        img, caption = cell(page, 1, col, 48, 56)
        expect = read_image(path, "RGB")
        np.testing.assert_array_equal(img, expect, err_msg=str(path))
        # a caption (name / scores) under the vis and fused images, none under the infrared
        assert (caption.min() < 100) == (col != 1), col
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.png"]  # written atomically


def test_gallery_cuts_long_names_to_their_column(tmp_path):
    methods = ("m" * 60, "b")  # 60 m's: about 360 px in the built-in font, the column 256
    dirs = make_folders(tmp_path, methods=methods, names=("x" * 60,))
    out = tmp_path / "g.png"
    assert run(dirs, "--gallery", out, methods=methods) == 0
    page = read_image(out, "RGB").min(-1)
    labels = page[: PAD + LINE]
    x2, x3 = PAD + 2 * (256 + PAD), PAD + 3 * (256 + PAD)
    assert labels[:, x2 + 200 : x2 + 256].min() < 100  # the long label fills its column ...
    assert labels[:, x2 + 256 : x3].min() > 200  # ... and stops before the gap
    assert labels[:, x3 + 12 : x3 + 256].min() > 200  # "b" alone in its column
    _, name = cell(page[..., None], 0, 0, 48, 56)
    gap = page[PAD + LINE + 48 + 1 : PAD + LINE + 48 + LINE, PAD + 256 : PAD + 256 + PAD]
    assert name.min() < 100 and gap.min() > 200  # the pair's long name, cut at its column


def test_gallery_needs_png_name(tmp_path, capsys):
    dirs = make_folders(tmp_path)
    assert run(dirs, "--gallery", tmp_path / "g.jpg") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gallery") and "g.jpg" in err and err.count("\n") == 1
    assert not (tmp_path / "g.jpg").exists()


def test_gallery_shrinks_large_images(tmp_path):
    dirs = make_folders(tmp_path, names=("big",), size=(300, 600))
    out = tmp_path / "g.png"
    assert run(dirs, "--gallery", out) == 0
    page = read_image(out, "RGB")
    # 600 x 300 fits 256 x 256 as 256 x 128
    assert page.shape == (PAD + LINE + 128 + LINE + PAD, PAD + 3 * (256 + PAD), 3)
    img, _ = cell(page, 0, 2, 128, 256)
    ref = Image.open(dirs["fused"] / "big.png").convert("RGB")
    ref.thumbnail((256, 256))
    np.testing.assert_array_equal(img, np.asarray(ref))


def test_demo_scenes():
    vis, ir = demo.make_pair()
    svis, sir = demo.make_pair(**demo.SCENES["street"])
    np.testing.assert_array_equal(vis, svis)  # the demo pair is the first scene
    np.testing.assert_array_equal(ir, sir)
    pairs = {n: demo.make_pair(**kw) for n, kw in demo.SCENES.items()}
    for n, (v, i) in pairs.items():
        assert v.shape == (*demo.DEMO_SIZE, 3) and i.shape == demo.DEMO_SIZE, n
        # people: warm (near 0.92 * 255) in the infrared image only
        assert (i > 220).mean() > 0.005 and (v.mean(-1) > 220).mean() < 0.05, n
    flipped = demo.make_pair(**{**demo.SCENES["crossing"], "mirror": False})
    np.testing.assert_array_equal(pairs["crossing"][1], flipped[1][:, ::-1])
    # fog: lower visible contrast than the clear street
    assert pairs["fog"][0].std() < 0.6 * vis.std()


def test_make_gallery_script(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    mg = importlib.import_module("make_gallery")
    out, work = tmp_path / "g.png", tmp_path / "work"
    assert mg.main(["--out", str(out), "--work", str(work)]) == 0
    names = sorted(f"{n}.png" for n in demo.SCENES)
    for sub in ("vis", "ir", "student", "max"):
        assert sorted(p.name for p in (work / sub).iterdir()) == names, sub
    vis, ir = demo.make_pair()
    gray = 0.299 * vis[..., 0] + 0.587 * vis[..., 1] + 0.114 * vis[..., 2]
    mx = read_image(work / "max" / "street.png", "L").astype(float)
    assert np.abs(mx - np.maximum(gray, ir)).max() <= 1
    fused = read_image(work / "student" / "street.png", "RGB")
    assert fused.shape == vis.shape and not np.array_equal(fused, vis)
    h, w = demo.DEMO_SIZE
    th = round(h * 256 / w)  # 192 x 256 is shown at 192 x 256
    page = read_image(out, "RGB")
    assert page.shape == (PAD + LINE + len(names) * (th + LINE + PAD), PAD + 4 * (256 + PAD), 3)
    # rows in name order: crossing, fog, street; the student's column holds its fused image
    img, _ = cell(page, names.index("street.png"), 2, th, 256)
    np.testing.assert_array_equal(img, fused)
    assert "student" in capsys.readouterr().out
