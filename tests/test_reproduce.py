"""scripts/reproduce_results.py: the baseline rows, on a split the test writes itself."""

import importlib.util
import json
import logging
import pathlib

import numpy as np

from dtpf_jax import checkpoint, evaluate, infer
from dtpf_jax.images import read_image, write_png_atomic

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "reproduce_results.py"
_spec = importlib.util.spec_from_file_location("reproduce_results", SCRIPT)
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)


def _toy_split(tmp_path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for sub in ("vi", "ir"):
        (root / "toy" / sub).mkdir(parents=True)
    for name in ("a", "b"):
        vis = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
        ir = rng.integers(0, 256, (48, 56), dtype=np.uint8)
        write_png_atomic(root / "toy" / "vi" / f"{name}.png", vis)
        write_png_atomic(root / "toy" / "ir" / f"{name}.png", ir)
    return root


def _main(argv: list[str]) -> int:
    """rr.main, the root logger's handlers and level put back after it (it sets up logging)."""
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    try:
        return rr.main(argv)
    finally:
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)


def test_baselines_only(tmp_path, caplog):
    root = _toy_split(tmp_path)
    out = tmp_path / "out"
    assert _main(["--data", str(root), "--out", str(out), "--splits", "toy"]) == 0
    # INFO progress gets through (caplog's own level is left alone: it sees what the loggers
    # let through; basicConfig alone does nothing once grain has given root a handler)
    assert "toy vis: fused 2 pairs" in caplog.text

    for name in ("a", "b"):
        vis = read_image(root / "toy" / "vi" / f"{name}.png", "RGB")
        ir = read_image(root / "toy" / "ir" / f"{name}.png", "L")
        # `vis` is the visible image itself, colour kept: what a network scores whose residual
        # is zero.
        np.testing.assert_array_equal(read_image(out / "fused/toy/vis" / f"{name}.png", "RGB"), vis)
        g = vis.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        got_max = read_image(out / "fused/toy/max" / f"{name}.png", "L").astype(np.float64)
        got_mean = read_image(out / "fused/toy/mean" / f"{name}.png", "L").astype(np.float64)
        assert np.abs(got_max - np.maximum(g, ir)).max() <= 1.0
        assert np.abs(got_mean - (g + ir) / 2).max() <= 1.0

    tables = (out / "tables.md").read_text()
    for conv in rr.CONVENTIONS:
        section = tables.split(f"## Convention `{conv}`")[1].split("## Convention")[0]
        rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
        assert rows[1:] == ["| vis", "| max", "| mean"], rows
    # the vis row's numbers are the evaluator's own on the unchanged visible images
    ev = evaluate.evaluate_folders(
        [root / "toy" / "vi"], root / "toy" / "vi", root / "toy" / "ir", "dtpf_table"
    )
    vif = next(iter(ev.means().values()))["VIF"]
    assert "| vis | " in tables and f"{vif:.4f}" in tables
    # infrared transfer: the visible image brings none of the infrared in, max all of it
    section = tables.split("## Convention `dtpf_table`")[1]
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in section.splitlines()}
    assert rows["| method"][-1] == "IRT |"
    assert rows["| vis"][-1] == "0.0000 |" and rows["| max"][-1] == "1.0000 |"


def test_a_new_student_is_not_scored_on_the_old_ones_images(tmp_path, tiny_student, caplog):
    cfg, params = tiny_student
    root, out = _toy_split(tmp_path), tmp_path / "out"
    weights = {k: tmp_path / f"{k}.msgpack" for k in ("old", "new")}
    checkpoint.save_params(weights["old"], params, cfg, {})
    checkpoint.save_params(weights["new"], infer.random_params(cfg, seed=5), cfg, {})
    argv = ["--data", str(root), "--out", str(out), "--splits", "toy", "--tiles-splits"]
    folder = out / "fused" / "toy" / "student"

    def run(which: str) -> dict[str, bytes]:
        caplog.clear()
        assert _main([*argv, "--student", str(weights[which])]) == 0
        stamp = json.loads((folder / "made_by.json").read_text())
        assert stamp["weights_sha256"] == checkpoint.file_sha256(weights[which])
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}

    old = run("old")
    new = run("new")  # the same folder: the old student's images are not reused
    assert "fused again" in caplog.text and "toy student: fused 2 pairs" in caplog.text
    assert list(new) == ["a.png", "b.png"] and all(new[k] != old[k] for k in old)
    assert run("new") == new and "fused" not in caplog.text  # same weights: all reused
    tables = (out / "tables.md").read_text()
    vis = read_image(folder / "a.png", "RGB")
    assert vis.shape == (48, 56, 3) and "| student | " in tables
