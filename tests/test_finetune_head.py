"""scripts/finetune_head.py: the head on cached features is the network's tail; only it trains."""

import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from dtpf_jax import checkpoint, datasets, infer, networks
from dtpf_jax.images import write_png_atomic

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "finetune_head.py"
_spec = importlib.util.spec_from_file_location("finetune_head", SCRIPT)
fh = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fh  # flax's dataclass transform looks the module up by name
_spec.loader.exec_module(fh)


_FORWARDS = {}


def _forward(cfg):
    """The network's jitted forward, one per config: compiled once for the 64x96 frames."""
    if id(cfg) not in _FORWARDS:
        _FORWARDS[id(cfg)] = jax.jit(networks.build_model(cfg).apply)
    return _FORWARDS[id(cfg)]


def _write_split(root, sizes, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("vi", "ir"):
        (root / sub).mkdir(parents=True)
    for k, (h, w) in enumerate(sizes):
        write_png_atomic(root / "vi" / f"{k:02d}.png", rng.integers(0, 256, (h, w, 3), np.uint8))
        write_png_atomic(root / "ir" / f"{k:02d}.png", rng.integers(0, 256, (h, w), np.uint8))


def test_head_is_the_networks_tail(tmp_path, tiny_student):
    cfg, params = tiny_student
    model = infer.Model(params=params, config=cfg, source="tiny")
    root = tmp_path / "data"
    _write_split(root / "toy", [(64, 96), (50, 90)])  # one padded shape: one compile
    pairs = datasets.split_pairs(datasets.find_splits(root / "toy")[0], root)
    frames = fh.cache_features(model, pairs)
    # a frame the network takes as it is: the head on its cached features gives the output
    f, vis, ir = frames[0]
    assert f.dtype == np.float16 and f.shape[:2] == vis.shape[:2] == ir.shape[:2] == (64, 96)
    want = _forward(cfg)({"params": params}, vis[None], ir[None])
    got = fh.Head(cfg).apply(
        {"params": {k: params[k] for k in fh.head_names(cfg)}},
        f[None].astype(np.float32),
        vis[None],
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3)
    # a frame that is padded for the network: features cropped back to its size
    assert frames[1][0].shape[:2] == (50, 90)

    # crops of features, vis and ir come from the same place
    coords = [
        np.mgrid[:h, :w].transpose(1, 2, 0).astype(np.float32) for h, w in [(40, 48), (36, 40)]
    ]
    toy = [(c.astype(np.float16), np.concatenate([c, c[..., :1]], -1), c[..., :1]) for c in coords]
    fb, vb, ib = fh.sample_batch(toy, np.random.default_rng(0), 5, 16)
    assert fb.shape == (5, 16, 16, 2) and vb.shape == (5, 16, 16, 3) and ib.shape == (5, 16, 16, 1)
    np.testing.assert_array_equal(fb.astype(np.float32), vb[..., :2])
    np.testing.assert_array_equal(ib, vb[..., :1])
    assert len({(float(b[0, 0, 0]), float(b[0, 0, 1])) for b in fb}) > 1  # not one fixed crop


def test_trains_only_the_head_and_writes_a_weight_file(tmp_path, tiny_student):
    cfg, params = tiny_student
    weights = tmp_path / "tiny.msgpack"
    checkpoint.save_params(weights, params, cfg, {"stage": "student", "step": 5, "quality": 0.5})
    _write_split(tmp_path / "data" / "toy", [(64, 64)] * 3)
    common = ["--weights", str(weights), "--data", str(tmp_path / "data"), "--train", "toy"]
    common += ["--steps", "3", "--lr", "1e-2", "--crop", "32", "--batch", "2", "--dtype", "float32"]
    # the whole 3-step schedule, a file after each step
    assert fh.main([*common, "--save-every", "1", "--out", str(tmp_path / "all.msgpack")]) == 0
    # step 2 of it remade with a record
    out, rec = tmp_path / "head.msgpack", tmp_path / "head.json"
    assert fh.main([*common, "--stop-after", "2", "--out", str(out), "--record", str(rec)]) == 0

    trained = infer.load_model(out)
    before, after = flatten_dict(params), flatten_dict(trained.params)
    assert before.keys() == after.keys()
    head = set(fh.head_names(cfg))
    changed = {k[0] for k in before if not np.array_equal(np.asarray(before[k]), after[k])}
    assert changed == head  # every head tensor moved, nothing else did
    assert trained.meta["finetune_head"]["frames"] == 2  # 3 frames minus the last 5 %
    assert trained.meta["step"] == 2 and trained.meta["finetune_head"]["steps"] == 3
    assert trained.meta["quality"] is None
    record = json.loads(rec.read_text())
    assert record["file"] == out.name and record["sha256"] == checkpoint.file_sha256(out)
    assert record["config"]["dim"] == cfg.dim
    # --stop-after 2 is step 2 of the 3-step run exactly (same crops, same learning rates)
    step2 = infer.load_model(tmp_path / "all_step2.msgpack")
    assert step2.meta["step"] == 2
    for k, v in flatten_dict(step2.params).items():
        np.testing.assert_array_equal(v, after[k])
    final = infer.load_model(tmp_path / "all.msgpack")
    assert final.meta["step"] == 3 and not (tmp_path / "all_step3.msgpack").exists()
    assert not np.array_equal(final.params["output"]["kernel"], trained.params["output"]["kernel"])


def test_level1_is_the_networks_full_resolution_level(tmp_path, tiny_student):
    cfg, params = tiny_student
    model = infer.Model(params=params, config=cfg, source="tiny")
    root = tmp_path / "data"
    _write_split(root / "toy", [(64, 96)], seed=1)
    pairs = datasets.split_pairs(datasets.find_splits(root / "toy")[0], root)
    ((f, vis, ir),) = fh.cache_features(model, pairs, "level1")
    assert f.dtype == np.float16 and f.shape == (64, 96, 3 * cfg.dim)
    want = _forward(cfg)({"params": params}, vis[None], ir[None])
    names = fh.part_names(cfg, "level1")
    assert names[0] == "feature_fusion_1" and names[-1] == "output"
    assert set(fh.head_names(cfg)) < set(names) and all(n in params for n in names)
    got = fh.Level1(cfg).apply(
        {"params": {k: params[k] for k in names}}, f[None].astype(np.float32), vis[None]
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3)
    # up2_1's output, then encoder_A's and encoder_B's level 1: swapping the encoders' thirds
    # gives another image
    a, b, c = np.split(f, 3, -1)
    swapped = fh.Level1(cfg).apply(
        {"params": {k: params[k] for k in names}},
        np.concatenate([a, c, b], -1)[None].astype(np.float32),
        vis[None],
    )
    assert np.abs(np.asarray(swapped) - np.asarray(want)).max() > 1e-2


def test_level1_trains_its_part_only(tmp_path, tiny_student):
    cfg, params = tiny_student
    weights = tmp_path / "tiny.msgpack"
    checkpoint.save_params(weights, params, cfg, {"stage": "student", "step": 5, "quality": 0.5})
    _write_split(tmp_path / "data" / "toy", [(64, 64)] * 3)
    out = tmp_path / "l1.msgpack"
    argv = ["--weights", str(weights), "--data", str(tmp_path / "data"), "--train", "toy"]
    argv += ["--steps", "2", "--lr", "1e-2", "--crop", "32", "--batch", "2", "--dtype", "float32"]
    assert fh.main([*argv, "--part", "level1", "--out", str(out)]) == 0
    trained = infer.load_model(out)
    before, after = flatten_dict(params), flatten_dict(trained.params)
    changed = {k[0] for k in before if not np.array_equal(np.asarray(before[k]), after[k])}
    assert changed == set(fh.part_names(cfg, "level1"))
    assert trained.meta["finetune_head"]["part"] == "level1"
