"""The evaluate CLI and library: pairing, CSV/HTML outputs, errors as one line with exit 2."""

from __future__ import annotations

import csv
import errno
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dtpf_jax import evaluate, metrics
from dtpf_jax.images import read_image

COLUMNS = ["name", *metrics.METRICS, *metrics.DIAGNOSTICS]


def _image(rng, h, w, channels=None):
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 70 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
    shape = (h, w) if channels is None else (h, w, channels)
    noise = rng.normal(0, 10, shape)
    img = (base[..., None] if channels else base) + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_folders(root, names=("a01", "b02", "c03"), size=(48, 56), methods=("fused",), seed=0):
    """vis (RGB .png), ir (gray .bmp) and one fused folder per method (RGB .png)."""
    rng = np.random.default_rng(seed)
    dirs = {k: root / k for k in ("vis", "ir", *methods)}
    for d in dirs.values():
        d.mkdir(parents=True)
    for n in names:
        vis, ir = _image(rng, *size, 3), _image(rng, *size)
        Image.fromarray(vis).save(dirs["vis"] / f"{n}.png")
        Image.fromarray(ir).save(dirs["ir"] / f"{n}.bmp")
        for i, m in enumerate(methods):
            fused = np.maximum(vis, ir[..., None]) if i == 0 else (vis // 2 + ir[..., None] // 2)
            Image.fromarray(fused).save(dirs[m] / f"{n}.png")
    return dirs


def run(dirs, *extra, methods=("fused",)):
    argv = ["--vis", str(dirs["vis"]), "--ir", str(dirs["ir"]), "--quiet"]
    for m in methods:
        argv += ["--fused", str(dirs[m])]
    return evaluate.main(argv + [str(x) for x in extra])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_happy_path_csv_html(tmp_path, capsys):
    dirs = make_folders(tmp_path)
    out = tmp_path / "out"
    assert run(dirs, "--csv", out / "s.csv", "--html", out / "r.html") == 0
    table = capsys.readouterr().out
    assert "convention clean" in table and "Nabf↓" in table and "MI↑" in table
    rows = read_csv(out / "s.csv")
    assert rows[0] == COLUMNS
    assert [r[0] for r in rows[1:]] == ["a01", "b02", "c03"]
    # every value at full precision and equal to the library's; MS_SSIM empty below 161 px
    name, vis, ir = "b02", dirs["vis"] / "b02.png", dirs["ir"] / "b02.bmp"
    fused = read_image(dirs["fused"] / f"{name}.png", "RGB")
    ref = metrics.evaluate_pair(fused, read_image(vis, "RGB"), read_image(ir, "L"), "clean")
    row = dict(zip(COLUMNS, rows[2], strict=True))
    assert row["MS_SSIM"] == ""
    for k in metrics.METRICS:
        if k != "MS_SSIM":
            assert float(row[k]) == ref[k], k
    irt = metrics.infrared_transfer(fused, read_image(vis, "RGB"), read_image(ir, "L"))
    assert float(row["IRT"]) == irt and "IRT↑" in table
    page = (out / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 9  # vis | ir | fused for 3 images
    assert "clean" in page and "Nabf↓" in page and "http" not in page
    assert sorted(p.name for p in out.iterdir()) == ["r.html", "s.csv"]  # no temporary files


def test_several_methods(tmp_path, capsys):
    methods = ("max_rule", "mean_rule")
    dirs = make_folders(tmp_path, methods=methods)
    csv_path = tmp_path / "s.csv"
    html_path = tmp_path / "r.html"
    args = ("--convention", "dtpf_table", "--csv", csv_path, "--html", html_path)
    assert run(dirs, *args, methods=methods) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "convention dtpf_table" in lines[0]
    assert [ln.split()[0] for ln in lines[2:]] == list(methods)
    rows = read_csv(csv_path)
    assert rows[0] == ["method", *COLUMNS]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (m, n) for m in methods for n in ("a01", "b02", "c03")
    ]
    assert read_csv(csv_path)[1][2:] != read_csv(csv_path)[4][2:]
    assert html_path.read_text().count("data:image/png;base64,") == 3 * 4


def test_library_means_and_markdown(tmp_path):
    dirs = make_folders(tmp_path, names=("x", "y"))
    ev = evaluate.evaluate_folders(dirs["fused"], dirs["vis"], dirs["ir"], "dtpf_table")
    assert ev.methods == ["fused"] and [p[0] for p in ev.pairs] == ["x", "y"]
    means = ev.means()["fused"]
    assert means.convention == "dtpf_table"
    assert means["VIF"] == pytest.approx(np.mean([s["VIF"] for s in ev.scores["fused"]]))
    assert math.isnan(means["MS_SSIM"])
    md = evaluate.format_table(ev, markdown=True)
    assert "| method | EN↑ |" in md and "Nabf↓" in md and "| fused |" in md


def test_metrics_subset_and_large_enough_for_ms_ssim(tmp_path):
    dirs = make_folders(tmp_path, names=("big",), size=(161, 170))
    ev = evaluate.evaluate_folders([dirs["fused"]], dirs["vis"], dirs["ir"], names=["MS_SSIM"])
    assert list(ev.scores["fused"][0]) == ["MS_SSIM"]
    assert 0 < ev.scores["fused"][0]["MS_SSIM"] <= 2


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unmatched_names(tmp_path, capsys):
    dirs = make_folders(tmp_path)
    (dirs["fused"] / "b02.png").unlink()
    (dirs["vis"] / "zz9.png").write_bytes((dirs["vis"] / "a01.png").read_bytes())
    assert run(dirs) == 2
    err = _one_error_line(capsys)
    assert "b02" in err and "zz9" in err and "same basename" in err


def test_corrupt_file(tmp_path, capsys):
    dirs = make_folders(tmp_path)
    (dirs["fused"] / "c03.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert run(dirs, "--csv", tmp_path / "s.csv") == 2
    assert "c03.png" in _one_error_line(capsys)
    assert not (tmp_path / "s.csv").exists()


def test_missing_folder_size_mismatch_and_tiny(tmp_path, capsys):
    dirs = make_folders(tmp_path / "one")
    shutil.rmtree(dirs["ir"])
    assert run(dirs) == 2
    assert "not a folder" in _one_error_line(capsys)
    dirs = make_folders(tmp_path / "two")
    Image.fromarray(np.zeros((48, 50, 3), np.uint8)).save(dirs["fused"] / "a01.png")
    assert run(dirs) == 2
    err = _one_error_line(capsys)
    assert "a01.png" in err and "50x48" in err and "56x48" in err
    dirs = make_folders(tmp_path / "three", size=(30, 60))
    assert run(dirs) == 2
    assert "too small" in _one_error_line(capsys)


def _digest(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_paths_are_checked_before_scoring(tmp_path, capsys, monkeypatch):
    dirs = make_folders(tmp_path, methods=("max_rule", "mean_rule"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "file.txt").write_text("a regular file")
    cases = [
        (("--html", dirs["vis"] / "a01.png"), "is an input image (--vis)"),
        (("--csv", dirs["mean_rule"] / "b02.png"), "is an input image (--fused)"),
        (("--gallery", dirs["ir"] / "fig.png"), "would add an image to the input folder"),
        (("--csv", tmp_path / "taken"), "is a folder"),
        (("--html", tmp_path / "file.txt" / "r.html"), "is a file, not a folder"),
        (("--csv", tmp_path / "x.csv", "--html", tmp_path / "x.csv"), "is --csv's file"),
    ]
    monkeypatch.setattr(metrics, "evaluate_pair", None)  # scoring anything would raise
    before = _digest(tmp_path)
    for extra, message in cases:
        assert run(dirs, *extra, methods=("max_rule", "mean_rule")) == 2
        err = _one_error_line(capsys)
        assert message in err and str(extra[1]) in err, err
    assert _digest(tmp_path) == before  # nothing written, nothing replaced


def test_a_write_that_fails_after_scoring_is_one_error_line(tmp_path, capsys, monkeypatch):
    # The paths pass the checks up front; the disk fills while the page is written.
    dirs = make_folders(tmp_path)
    out = tmp_path / "out"
    real = evaluate.atomic_write

    def disk_full(path, payload):
        if str(path).endswith(".html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(evaluate, "atomic_write", disk_full)
    extra = ("--csv", out / "s.csv", "--html", out / "r.html", "--gallery", out / "g.png")
    assert run(dirs, *extra) == 2
    captured = capsys.readouterr()
    assert "convention clean" in captured.out  # the table was printed before
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert err == [
        f"error: cannot write {out / 'r.html'}: No space left on device; pass a writable file path"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["s.csv"]  # the gallery after it: not made


def test_keep_going_scores_what_is_there(tmp_path, capsys):
    """A name missing from one method, a corrupt source and a size mismatch: left out of every
    method's scores, one line each, exit 1; strict, the same folders are an error."""
    methods = ("max_rule", "mean_rule")
    dirs = make_folders(tmp_path, names=("a01", "b02", "c03", "d04"), methods=methods)
    (dirs["mean_rule"] / "b02.png").unlink()
    (dirs["vis"] / "c03.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((48, 50), np.uint8)).save(dirs["ir"] / "d04.bmp")
    assert run(dirs, methods=methods) == 2
    _one_error_line(capsys)
    csv_path = tmp_path / "s.csv"
    assert run(dirs, "--keep-going", "--csv", csv_path, methods=methods) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0].startswith("skipped: b02: missing in ") and "mean_rule" in err[0]
    assert err[1].startswith("skipped: c03: ") and "c03.png" in err[1]
    assert err[2].startswith("skipped: d04: ") and "50x48" in err[2]
    assert err[3:] == ["skipped: 3 pairs left out (listed above)"]
    assert "mean over 1 images (3 pairs left out" in captured.out
    assert [(r[0], r[1]) for r in read_csv(csv_path)[1:]] == [(m, "a01") for m in methods]


def test_module_entry_point(tmp_path):
    dirs = make_folders(tmp_path)
    (dirs["ir"] / "a01.bmp").unlink()
    cmd = [sys.executable, "-m", "dtpf_jax.evaluate", "--vis", str(dirs["vis"])]
    cmd += ["--ir", str(dirs["ir"]), "--fused", str(dirs["fused"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unmatched file names") and "a01" in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_worked_example_through_folders(shared_dir, tmp_path):
    case = shared_dir / "metric_cases" / "FLIR_05767"
    if not case.is_dir():
        pytest.skip(f"{case} is not available")
    for role, src in (("vis", "vis_rgb.png"), ("ir", "ir.png"), ("max_gray", "fused_max_gray.png")):
        (tmp_path / role).mkdir()
        shutil.copy(case / src, tmp_path / role / "FLIR_05767.png")
    expected = {"clean": (0.816650, 7.074201), "dtpf_table": (0.802649, 6.557078)}
    for convention, (vif, mi) in expected.items():
        ev = evaluate.evaluate_folders(
            tmp_path / "max_gray", tmp_path / "vis", tmp_path / "ir", convention
        )
        scores = ev.scores["max_gray"][0]
        assert abs(scores["VIF"] - vif) < 1e-6 and abs(scores["MI"] - mi) < 1.5e-6
