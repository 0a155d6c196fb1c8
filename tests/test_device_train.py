"""The GPU command (scripts/device_train.sh run) in its smoke form on the CPU, what it leaves for
the device tool to bring back, and the ship rule's pieces (scripts/select_student.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from dtpf_jax import checkpoint, demo, fuse, text
from dtpf_jax.images import read_image, write_png_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]
MIB = 2**20
# What the device tool brings back: at most 8 files, 16 MiB each, 64 MiB together.
XLA_FLAGS = os.environ["XLA_FLAGS"]  # conftest's
OUT_FILE = re.compile(
    r"(run\.log|timing\.json|candidates\.json|speed\.json|student_s\d{5}\.msgpack|xla_cache\.tar)"
)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_msrs_like(root: pathlib.Path, n: int = 8, split: str = "msrs/train") -> None:
    """n synthetic pairs (demo scenes, 64x80) as a split (msrs/train: its last 5 % held back)."""
    for sub in ("vi", "ir"):
        (root / split / sub).mkdir(parents=True)
    for k in range(n):
        people = ((0.2 + 0.08 * k % 0.6, 0.7, 1.0), (0.8 - 0.05 * k % 0.6, 0.75, 1.2))
        vis, ir = demo.make_pair(64, 80, people=people, mirror=bool(k % 2))
        write_png_atomic(root / split / "vi" / f"p{k:02d}.png", vis)
        write_png_atomic(root / split / "ir" / f"p{k:02d}.png", ir)


def test_gpu_command_in_smoke_form_leaves_what_comes_back(tmp_path, monkeypatch):
    carry, out = tmp_path / "carry", tmp_path / "out"
    _write_msrs_like(carry / "data")
    text.caption_tree(carry / "data", carry / "captions")
    env = dict(os.environ)
    env.update(
        CARRY=str(carry),
        OUT=str(out),
        SCRATCH=str(tmp_path / "scratch"),
        SMOKE="1",
        BUDGET_S="900",
        PROBE_STEPS="2",  # one warm-up, one timed
        JAX_PLATFORMS="cpu",
        # conftest's fast-compiling programs, on one device
        XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", XLA_FLAGS),
        # the script calls python3: this interpreter (its venv), whether or not it is activated
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        # a compile cache of its own, which comes back as xla_cache.tar (a slot is kept for it
        # here by bringing back 3 candidates; the GPU form's 7 files leave one)
        XLA_CACHE=str(tmp_path / "xla_cache"),
        # the smallest model of every module kind, batch 2
        TRAIN_ARGS="--config.model.num_blocks=(0,0,0,0) --config.model.num_refinement_blocks=0 "
        "--config.batch_size=2 --candidates=3",
    )

    def device_command(**more):
        proc = subprocess.run(
            ["bash", "scripts/device_train.sh", "run"],
            cwd=REPO,
            env=env | more,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    device_command()

    files = sorted(out.iterdir())
    names = [f.name for f in files]
    assert all(f.is_file() and OUT_FILE.fullmatch(f.name) for f in files), names
    sizes = [f.stat().st_size for f in files]
    assert len(files) <= 8 and max(sizes) <= 16 * MIB and sum(sizes) <= 64 * MIB

    timing = json.loads((out / "timing.json").read_text())
    assert "error" not in timing and timing["done"] and timing["device"] == "cpu"
    assert timing["phase"] == "done"
    assert list(timing["probe"]) == ["bfloat16"]  # the default: one compile, at bf16
    r = timing["probe"]["bfloat16"]
    assert r["compile_s"] > 0 and r["step_s"] > 0 and r["images_per_s"] > 0, r
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert timing["dtype"] == "bfloat16" and timing["pipeline"]["batches_per_s"] > 0
    log = (out / "run.log").read_text()
    assert "does not fit the loop" not in log  # training ran the probe's compiled program
    assert timing["input_workers"] == 0  # threads outpace a CPU step: no worker processes
    assert timing["train"]["step"] == 4 and timing["train"]["every"] == 1  # smoke: 4 steps
    assert timing["elapsed_s"] <= 900

    run = json.loads((out / "candidates.json").read_text())
    cands = run["candidates"]
    assert run["config"]["eval_every"] == 0 and "validation" not in log  # none on the device
    assert [c["step"] for c in cands] == [2, 3, 4] and len(files) == 8
    assert run["config"]["stage"] == "student" and run["config"]["model"]["remat"] is False
    for c in cands:
        params, cfg, meta = checkpoint.load_params(out / c["file"])
        assert cfg.dtype == "float32" and meta["trained_dtype"] == timing["dtype"]
        assert checkpoint.file_sha256(out / c["file"]) == c["sha256"]
    speed = json.loads((out / "speed.json").read_text())
    steps = [r for r in speed if r.get("kind") == "train_step"]
    forwards = [r for r in speed if r not in steps]
    assert {r["dtype"] for r in steps} == {"bfloat16"}  # the probe's
    # the smoke grid: two programs compiled side by side, timed in order
    assert [(r["model"], r["batch"]) for r in forwards] == [("student", 1), ("student", 2)]
    assert all(r["compile_threads"] == 2 and r["compiles_beside"] in (0, 1) for r in forwards)
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in forwards + steps)

    # README's GPU rows from what came back
    table = _script("speed_table").render(speed, timing)
    assert "| student | 64² | " in table and "batch 2, images/s: fp32 / bf16" in table
    row = next(line for line in table.splitlines() if line.startswith("| student | 64²"))
    assert re.fullmatch(r"\| student \| 64² \| [\d.]+ / – \| [\d.]+ / – \|", row), row
    assert "- training step, student, batch 2 of 64², bfloat16: " in table

    # the compile cache came back; carried into a second run, it serves the train step
    cache = timing["compile_cache"]
    assert cache["entries_at_start"] == 0 and cache["compiled"] > 0 and cache["packed"] > 0
    with tarfile.open(out / "xla_cache.tar") as tar:
        packed = tar.getnames()
    assert len(packed) == cache["packed"] and not cache["left_out"]
    assert packed[0].startswith("jit__teacher_step-")  # the train step first
    (carry / "xla_cache.tar").write_bytes((out / "xla_cache.tar").read_bytes())
    out2 = tmp_path / "out2"
    # a fresh machine: the folder is new, at the same path (jax's cache key holds the path)
    shutil.rmtree(tmp_path / "xla_cache")
    device_command(OUT=str(out2), GRID_S="0")
    timing2 = json.loads((out2 / "timing.json").read_text())
    assert timing2["done"] and timing2["compile_cache"]["entries_at_start"] == len(packed)
    assert timing2["compile_cache"]["hits"] >= 1, timing2["compile_cache"]
    compile_s = [t["probe"]["bfloat16"]["compile_s"] for t in (timing, timing2)]
    assert compile_s[1] < compile_s[0] / 2, compile_s
    # stage carries the entries that fit in what travels, in their packing order
    dt, full = _script("device_train"), tmp_path / "full"
    full.mkdir()
    for name in [*(f"f{k}" for k in range(8)), "xla_cache.tar"]:
        (full / name).write_bytes(b"")
    first = tarfile.open(out / "xla_cache.tar").getmembers()[0]
    room = str(1024 + 512 + -(-first.size // 512) * 512)  # room for the first entry only
    assert dt.trim_cache_tar([str(out / "xla_cache.tar"), str(tmp_path / "t.tar"), room]) == 0
    assert tarfile.open(tmp_path / "t.tar").getnames() == [first.name]
    assert dt.trim_cache_tar([str(full / "f0"), str(tmp_path / "u.tar"), room]) == 1
    assert not (tmp_path / "u.tar").exists()  # not a tar: nothing carried

    # a run without a free file slot (8 others) brings back no tar, and leaves no older one
    assert dt.pack_compile_cache(tmp_path / "xla_cache", full)["packed"] == 0
    assert len(list(full.iterdir())) == 8 and not (full / "xla_cache.tar").exists()

    # the last candidate fuses a pair through the CLI, at the pair's size
    pair = tmp_path / "pair"
    for sub in ("vi", "ir"):
        (pair / sub).mkdir(parents=True)
        (pair / sub / "p07.png").write_bytes(
            (carry / "data/msrs/train" / sub / "p07.png").read_bytes()
        )
    weights = out / cands[-1]["file"]
    args = ["--vis", pair / "vi", "--ir", pair / "ir", "--out", tmp_path / "fused"]
    assert fuse.main([str(a) for a in args] + ["--weights", str(weights)]) == 0
    assert read_image(tmp_path / "fused" / "p07.png", "RGB").shape == (64, 80, 3)

    # the ship rule on a stand-in for the selection data (one msrs/train frame held back, one
    # RoadScene pair after the first 40), the first candidate standing for the shipped file
    sel, root = _script("select_student"), tmp_path / "sel"
    _write_msrs_like(root, n=2)
    _write_msrs_like(root, n=41, split="roadscene")
    shipped = tmp_path / "weights" / "student_ivf.msgpack"
    shipped.parent.mkdir()
    monkeypatch.setattr(sel, "SHIPPED", shipped)
    rule = sel.decide  # tested on its own below; forced to ship here, to test --ship
    monkeypatch.setattr(sel, "decide", lambda *a: {**rule(*a), "ships": True})
    files = [str(out / c["file"]) for c in cands]
    argv = ["--candidates", *files[1:], "--shipped", files[0], "--data", str(root)]
    assert sel.main([*argv, "--out", str(tmp_path / "selection"), "--ship"]) == 0
    verdict = json.loads((tmp_path / "selection" / "decision.json").read_text())
    assert verdict["winner"] in ("student_s00003", "student_s00004")
    assert set(verdict["bars"]) == {"shipped", "vis"} and verdict["ships"]
    record = json.loads(shipped.with_suffix(".json").read_text())
    winner = out / f"{verdict['winner']}.msgpack"
    assert record["sha256"] == checkpoint.file_sha256(shipped) == checkpoint.file_sha256(winner)
    assert record["file"] == "student_ivf.msgpack" and record["step"] in (3, 4)
    assert record["selection"]["score"] == verdict["score"]
    rows = (tmp_path / "selection" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 5  # 2 pairs x (vis, max, shipped, 2 candidates)
    table = (tmp_path / "selection" / "selection.md").read_text()
    assert "| vis | " in table and "| max | " in table and "(1 pairs)" in table

    # a second selection takes every row from the first one's cache: nothing is fused again,
    # the scores are the same; a candidate renamed is known by its weight file's sha256
    renamed = tmp_path / "renamed.msgpack"
    renamed.write_bytes(pathlib.Path(files[-1]).read_bytes())
    monkeypatch.setattr(sel.infer, "fuse_images", lambda *a, **k: 1 / 0)
    again = ["--candidates", files[1], str(renamed), "--shipped", files[0], "--data", str(root)]
    assert sel.main([*again, "--out", str(tmp_path / "selection")]) == 0
    rows_again = (tmp_path / "selection" / "scores.csv").read_text().splitlines()
    assert rows_again == [r.replace(pathlib.Path(files[-1]).stem, "renamed") for r in rows]


def test_dtype_pick_candidate_steps_and_ship_verdict():
    dt = _script("device_train")
    fp = {"step_s": 0.10, "losses": [9.0, 8.0, 7.0, 6.0]}
    faster = {"step_s": 0.05, "losses": [9, 8, 7, 6]}
    assert dt.pick_dtype({"float32": fp, "bfloat16": faster})[0] == "bfloat16"
    slower = {"step_s": 0.095, "losses": [9, 8, 7, 6]}  # under 10 % faster: not worth it
    assert dt.pick_dtype({"float32": fp, "bfloat16": slower})[0] == "float32"
    worse = {"step_s": 0.05, "losses": [9, 8, 7.5, 6.5]}  # trains worse: 7.0 vs 6.5 mean
    assert dt.pick_dtype({"float32": fp, "bfloat16": worse})[0] == "float32"
    assert dt.pick_dtype({"bfloat16": worse})[0] == "bfloat16"  # --dtype: no pick
    # the final step, and before it the latest periodic ones at least half an interval earlier
    assert dt.candidate_steps([250, 500, 750, 1000, 1200], 250, 4) == [500, 750, 1000, 1200]
    assert dt.candidate_steps([250, 500, 750, 1000, 1040], 250, 4) == [250, 500, 750, 1040]
    assert dt.candidate_steps([250, 500, 600], 250, 4) == [250, 600]
    assert dt.candidate_steps([90], 250, 4) == [90]
    assert dt.candidate_steps([250, 500], 250, 1) == [500]

    sel = _script("select_student")
    scores = {"vis": 7.0, "max": 4.0, "shipped": 7.1, "a": 6.9, "b": 7.05}
    assert sel.decide(scores, ["a", "b"]) == {
        "winner": "a",
        "score": 6.9,
        "bars": {"shipped": 7.1, "vis": 7.0},
        "ships": True,
    }
    assert not sel.decide(scores | {"a": 7.02}, ["a", "b"])["ships"]  # above vis: not shipped
    assert not sel.decide(scores | {"shipped": 6.5}, ["a", "b"])["ships"]  # above the shipped


def test_selection_row_cache(tmp_path, monkeypatch):
    sel = _script("select_student")
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(sel, "REPO", tmp_path)
    monkeypatch.setattr(sel, "CODE", ("a.py",))
    cache = sel.RowCache(tmp_path / "cache")
    cache.put("vis", "p1", {"loss": 7.5, "IRT": float("nan")})
    cache.put("vis", "p2", {"loss": 6.0, "IRT": 0.0})
    with open(cache.folder / "vis.jsonl", "a") as f:
        f.write('{"pair": "p3", "lo')  # a run killed while writing
    again = sel.RowCache(tmp_path / "cache")
    assert again.get("vis", "p2") == {"loss": 6.0, "IRT": 0.0}
    assert math.isnan(again.get("vis", "p1")["IRT"]) and again.get("vis", "p3") is None
    assert again.get("shipped", "p2") is None
    (tmp_path / "a.py").write_text("x = 2\n")  # the code that makes the rows changed
    assert sel.RowCache(tmp_path / "cache").get("vis", "p2") is None
    assert sel.RowCache(None).get("vis", "p2") is None and sel.RowCache(None).folder is None


def test_speed_table_cells():
    st = _script("speed_table")
    rec = {"model": "teacher", "height": 480, "width": 640, "batch": 1, "device": "GPU X"}
    records = [
        {**rec, "dtype": "float32", "median_ms": 108.04, "images_per_s": 9.26},
        {**rec, "dtype": "bfloat16", "error": "RESOURCE_EXHAUSTED: out of memory"},
        {**rec, "batch": 16, "dtype": "bfloat16", "median_ms": 700.0, "images_per_s": 22.857},
        {**rec, "model": "student", "height": 128, "width": 128, "dtype": "bfloat16",
         "median_ms": 3.951, "images_per_s": 253.1},
    ]  # fmt: skip
    probe = {"compile_s": 158.5, "step_s": 0.0544, "steps_per_s": 18.38, "images_per_s": 294.1}
    timing = {"crop": 128, "batch": 16, "probe": {"bfloat16": probe}}
    lines = st.render(records, timing).splitlines()
    assert lines[0] == "On GPU X:"
    head = "| model | input | batch 1, ms: fp32 / bf16 | batch 16, images/s: fp32 / bf16 |"
    assert lines[2] == head
    assert lines[4:6] == [  # the student first, then by size
        "| student | 128² | – / 3.95 | – / – |",
        "| teacher | 480×640 | 108 / error | – / 22.9 |",
    ]
    assert lines[-1] == (
        "- training step, student, batch 16 of 128², bfloat16: 18.4 steps/s (294 crops/s; "
        "compile 158 s)"
    )


def test_ship_rule_selection_sets(shared_data):
    sets = _script("select_student").selection_sets(shared_data)
    msrs, road = sets.values()
    assert [p.name for p in msrs] == ["00881N", "01023N"]  # msrs/train's held-back frames
    assert len(road) == 181 and (road[0].name, road[-1].name) == ("FLIR_04354", "FLIR_video_04215")


def test_init_is_one_program_at_any_compute_dtype():
    # The probe compiles init once for both dtypes and the run gets it from the cache.
    from dtpf_jax import config_lib, steps

    cfg = config_lib.load_config_file(REPO / "configs" / "distill.py", "nodistill,gpu,smoke")
    programs = []
    for dtype in ("float32", "bfloat16"):
        cfg.model.dtype = dtype
        programs.append(str(jax.make_jaxpr(steps.make_init(cfg))(jax.random.key(0))))
    assert programs[0] == programs[1]
    assert cfg.model.remat is False and cfg.batch_size == 4  # gpu's settings, smoke's sizes


def test_stage_images_as_webp_and_grain_without_array_record(tmp_path, monkeypatch):
    # stage's WebP files decode to the training images' pixels, as RGB and as gray
    dt, root = _script("device_train"), tmp_path / "data"
    _write_msrs_like(root, n=3)
    pngs = sorted(root.rglob("*.png"))
    deep = root / "other" / "deep.png"  # 16-bit: WebP would lose levels, so it stays
    deep.parent.mkdir()
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 30).save(deep)
    pixels = {p: [read_image(p, m) for m in ("RGB", "L")] for p in pngs}
    before = sum(p.stat().st_size for p in pngs)
    with monkeypatch.context() as m:  # a Pillow without WebP: the images travel as they are
        m.setattr(dt.features, "check", lambda feature: False)
        assert dt.webp_tree([str(root)]) == 0 and not list(root.rglob("*.webp"))
    assert dt.webp_tree([str(root)]) == 0
    webps = sorted(root.rglob("*.webp"))
    assert [w.with_suffix(".png") for w in webps] == pngs and deep.exists()
    assert not any(p.exists() for p in pngs) and sum(w.stat().st_size for w in webps) < before
    for p, (rgb, gray) in pixels.items():
        w = p.with_suffix(".webp")
        assert np.array_equal(read_image(w, "RGB"), rgb)
        assert np.array_equal(read_image(w, "L"), gray)

    # grain with scripts/device_shim in place of array_record, as on the GPU machine, reads
    # training batches from them
    probe = f"""
import sys
sys.path.insert(0, {str(REPO / "scripts" / "device_shim")!r})
import array_record.python.array_record_data_source as ar
import grain
from dtpf_jax import data, datasets
assert "device_shim" in ar.__file__, ar.__file__
try:
    grain.sources.ArrayRecordDataSource([])
except RuntimeError as e:
    print("refused:", e)
cfg = datasets.default_config()
cfg.root, cfg.crop = {str(root)!r}, 32
batch = next(data.make_train_iter(cfg, global_batch=2))
print("batch", *sorted((k, v.shape) for k, v in batch.items() if hasattr(v, "shape")))
"""
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: array_record is not installed here" in proc.stdout
    assert "('vis', (2, 32, 32, 3))" in proc.stdout and "('ir', (2, 32, 32, 1))" in proc.stdout


def test_webp_read_through_opencv_where_pillow_lacks_it(tmp_path, monkeypatch):
    # the way out on a GPU machine whose Pillow had no WebP: its OpenCV, to the same pixels
    pytest.importorskip("cv2")  # the GPU machine has it; the test environment need not
    dt, root = _script("device_train"), tmp_path / "data"
    _write_msrs_like(root, n=1)
    pngs = sorted(root.rglob("*.png"))
    pixels = {p: [read_image(p, m) for m in ("RGB", "L")] for p in pngs}
    assert dt.webp_tree([str(root)]) == 0
    monkeypatch.setattr(dt.features, "check", lambda feature: False)
    for p, (rgb, gray) in pixels.items():
        w = p.with_suffix(".webp")
        assert np.array_equal(dt.read_training_image(w, "RGB"), rgb)
        assert np.array_equal(dt.read_training_image(w, "L"), gray)
