"""Dataset layouts, pairing, grain pipelines (crop, flips, padding, resume, sharding), `check`."""

import logging
import pathlib
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from dtpf_jax import data, datasets, images, parallel
from dtpf_jax.losses import IVF_TASK_WEIGHTS


def _png(path: pathlib.Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def _pairs(folder: pathlib.Path, a: str, b: str, names, hw=(20, 24), seed=0) -> None:
    """Random RGB A images and gray B images with the same names."""
    rng = np.random.default_rng(seed)
    for n in names:
        _png(folder / a / f"{n}.png", rng.integers(0, 256, (*hw, 3)))
        _png(folder / b / f"{n}.png", rng.integers(0, 256, hw))


def _cfg(root, train=(".",), **kw):
    cfg = datasets.default_config(kw.pop("kind", "ivf"))
    cfg.root = str(root)
    cfg.train = cfg.val = cfg.test = tuple(train)
    cfg.crop, cfg.read_threads, cfg.prefetch = 16, 0, 1
    cfg.update(kw)
    return cfg


def test_layouts_are_found_with_their_kind(tmp_path):
    _pairs(tmp_path / "msrs/train", "vi", "ir", ["a"])
    _pairs(tmp_path / "msrs/test", "vi", "ir", ["b"])
    road = tmp_path / "road"
    _pairs(road, "crop_LR_visible", "cropinfrared", ["c"])
    _pairs(road, "crop_HR_visible", "infrared", ["c"])  # unpaired extras of the official repo
    _pairs(tmp_path / "M3FD", "Vis", "Ir", ["d"])
    _pairs(tmp_path / "Med/CT-MRI/train", "CT", "MRI", ["e"])
    _pairs(tmp_path / "Med/SPECT-MRI/test", "SPECT", "MRI", ["f"])
    _pairs(tmp_path / "harvard/pet_mri/train", "pet", "mri", ["g"])
    found = {datasets.relative_split(s, tmp_path): s for s in datasets.find_splits(tmp_path)}
    assert sorted(found) == sorted(
        [
            "msrs/train",
            "msrs/test",
            "road",
            "M3FD",
            "Med/CT-MRI/train",
            "Med/SPECT-MRI/test",
            "harvard/pet_mri/train",
        ]  # fmt: skip
    )
    assert found["road"].a_dir.name == "crop_LR_visible"
    assert found["road"].b_dir.name == "cropinfrared"
    assert (found["M3FD"].a_dir.name, found["M3FD"].kind) == ("Vis", "ivf")
    assert (found["Med/CT-MRI/train"].a_dir.name, found["Med/CT-MRI/train"].kind) == (
        "CT",
        "medical",
    )
    assert datasets.find_splits(tmp_path / "msrs/train")[0].path == tmp_path / "msrs/train"


def test_pairing_is_by_name_and_unmatched_names_are_listed(tmp_path):
    _png(tmp_path / "vi/x.png", np.zeros((4, 4, 3)))
    _png(tmp_path / "vi/y.jpg", np.zeros((4, 4, 3)))
    _png(tmp_path / "ir/x.bmp", np.zeros((4, 4)))
    _png(tmp_path / "ir/y.png", np.zeros((4, 4)))
    pairs = datasets.split_pairs(datasets.split_of(tmp_path), tmp_path)
    assert [(p.name, pathlib.Path(p.a).name, pathlib.Path(p.b).name) for p in pairs] == [
        ("x", "x.png", "x.bmp"), ("y", "y.jpg", "y.png")]  # fmt: skip
    _png(tmp_path / "ir/z.png", np.zeros((4, 4)))
    with pytest.raises(images.DataError, match=r"1 missing in .*vi \(A\): z"):
        datasets.split_pairs(datasets.split_of(tmp_path), tmp_path)


def test_split_ranges_partition_the_sorted_pairs(tmp_path):
    _pairs(tmp_path / "train", "vi", "ir", [f"{i:03d}" for i in range(34)], hw=(4, 4))
    cfg = _cfg(tmp_path, ["train"])
    train, val = datasets.source_pairs(cfg, "train"), datasets.source_pairs(cfg, "val")
    assert len(train) == 32 and len(val) == 2  # official: first 95 % / last 5 %
    assert [p.name for p in train + val] == [f"{i:03d}" for i in range(34)]
    assert train[0].split == "train"
    cfg.kind = "medical"
    with pytest.raises(images.DataError, match="ivf layout"):
        datasets.source_pairs(cfg, "train")


def _coded_pair(folder: pathlib.Path, h: int, w: int) -> None:
    """vis G = row, vis B = column, vis R = ir = a code of (row, column)."""
    y, x = np.mgrid[:h, :w]
    code = (y * 31 + x * 17) % 256
    _png(folder / "vi/p.png", np.stack([code, y, x], -1))
    _png(folder / "ir/p.png", code)


def test_crop_is_at_the_same_place_in_both_images_and_flips_jointly(tmp_path):
    _coded_pair(tmp_path, 40, 50)
    rec = {"a": str(tmp_path / "vi/p.png"), "b": str(tmp_path / "ir/p.png"),
           "text_emb": np.zeros(4, np.float32), "weights": np.ones(5, np.float32)}  # fmt: skip
    ex = data.LoadPair().map(rec)
    orientations = set()
    for seed in range(24):
        out = data.RandomCropFlip(16).random_map(ex, np.random.default_rng(seed))
        vis, ir = np.round(out["vis"] * 255), np.round(out["ir"][..., 0] * 255)
        assert out["vis"].shape == (16, 16, 3) and out["ir"].shape == (16, 16, 1)
        assert out["vis"].dtype == np.float32
        rows, cols = vis[..., 1], vis[..., 2]
        np.testing.assert_array_equal(ir, (rows * 31 + cols * 17) % 256)  # same pixel in A and B
        np.testing.assert_array_equal(vis[..., 0], ir)
        orientations.add((rows[1, 0] > rows[0, 0], cols[0, 1] > cols[0, 0]))
        again = data.RandomCropFlip(16).random_map(ex, np.random.default_rng(seed))
        np.testing.assert_array_equal(again["vis"], out["vis"])
    assert len(orientations) == 4  # all flip combinations occur


def test_small_images_are_reflect_padded_with_one_warning(tmp_path, caplog):
    _pairs(tmp_path, "vi", "ir", ["a", "b", "c"], hw=(10, 12))
    with caplog.at_level(logging.WARNING, logger="dtpf_jax.data"):
        it = data.make_train_iter(_cfg(tmp_path, train_split=(0, 1)), global_batch=2, seed=0)
        batches = [next(it) for _ in range(4)]
    assert batches[0]["vis"].shape == (2, 16, 16, 3) and batches[0]["ir"].shape == (2, 16, 16, 1)
    padded = [r for r in caplog.records if "reflect-padded" in r.getMessage()]
    assert len(padded) == 1 and "3 of 3 pairs" in padded[0].getMessage()
    np.testing.assert_array_equal(
        data.pad_to(np.arange(3)[None, :].repeat(2, 0), 5)[0], [0, 1, 2, 1, 0]
    )


def test_train_iter_elements_determinism_and_no_caption_defaults(tmp_path):
    _pairs(tmp_path, "vi", "ir", [f"{i}" for i in range(6)], hw=(24, 20))
    cfg = _cfg(tmp_path, train_split=(0, 1))
    b = next(data.make_train_iter(cfg, global_batch=4, seed=7))
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "vis": ((4, 16, 16, 3), np.float32), "ir": ((4, 16, 16, 1), np.float32),
        "text_emb": ((4, 512), np.float32), "weights": ((4, 5), np.float32)}  # fmt: skip
    assert 0 <= b["vis"].min() and b["vis"].max() <= 1
    assert not b["text_emb"].any()  # no captions configured: zero embeddings, default weights
    np.testing.assert_array_equal(b["weights"], np.tile(IVF_TASK_WEIGHTS["default"], (4, 1)))
    again = next(data.make_train_iter(cfg, global_batch=4, seed=7))
    other = next(data.make_train_iter(cfg, global_batch=4, seed=8))
    np.testing.assert_array_equal(again["vis"], b["vis"])
    assert not np.array_equal(other["vis"], b["vis"])


def test_iterator_state_restores_the_next_batch(tmp_path):
    _pairs(tmp_path, "vi", "ir", [f"{i}" for i in range(5)], hw=(20, 20))
    cfg = _cfg(tmp_path, train_split=(0, 1), read_threads=2, prefetch=3)
    it = data.make_train_iter(cfg, global_batch=2, seed=3)
    for _ in range(4):  # crosses an epoch boundary (5 pairs, batch 2)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    fresh = data.make_train_iter(cfg, global_batch=2, seed=3)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def test_orbax_checkpoint_of_a_sharded_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _pairs(tmp_path / "d", "vi", "ir", [f"{i}" for i in range(6)], hw=(20, 20))
    cfg, mesh = _cfg(tmp_path / "d", train_split=(0, 1)), parallel.make_mesh()
    it = data.make_train_iter(cfg, global_batch=8, seed=0, mesh=mesh)
    first = next(it)
    assert first["vis"].shape == (8, 16, 16, 3) and first["text_emb"].shape == (8, 512)
    assert first["vis"].sharding.spec == parallel.batch_sharding(mesh).spec
    assert len(first["vis"].addressable_shards) == 4
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    state = {"step": np.arange(3)}
    save = grain.checkpoint.CheckpointSave(it)
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=save))
    mngr.wait_until_finished()
    want = next(it)
    fresh = data.make_train_iter(cfg, global_batch=8, seed=0, mesh=mesh)
    restore = grain.checkpoint.CheckpointRestore(fresh)
    mngr.restore(
        1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), data_iter=restore)
    )
    np.testing.assert_array_equal(np.asarray(next(fresh)["vis"]), np.asarray(want["vis"]))
    mngr.close()


def test_eval_pairs_are_whole_images_in_order(tmp_path):
    _pairs(tmp_path, "vi", "ir", ["b", "a", "c"], hw=(13, 17))
    ds = data.make_eval_pairs(_cfg(tmp_path, test_split=(0, 1)), "test")
    items = list(data.iter_pairs(ds))
    assert len(ds) == 3 and [e["name"] for e in items] == ["a", "b", "c"]
    e = items[0]
    assert e["vis"].shape == (13, 17, 3) and e["ir"].shape == (13, 17, 1)
    np.testing.assert_array_equal(
        e["vis"], images.read_image(tmp_path / "vi/a.png", "RGB") / np.float32(255)
    )
    assert e["text_emb"].shape == (512,) and e["weights"].shape == (5,)


def test_check_reports_problems_and_exit_code(tmp_path, capsys):
    _pairs(tmp_path / "good", "vi", "ir", ["a", "b"])
    assert data.main(["check", str(tmp_path / "good")]) == 0
    assert "2 pairs" in capsys.readouterr().out
    bad = tmp_path / "bad"
    _pairs(bad / "one", "vi", "ir", ["a", "b"])
    _png(bad / "one/vi/lonely.png", np.zeros((4, 4, 3)))
    _png(bad / "one/ir/b.png", np.zeros((5, 5)))  # size mismatch
    _pairs(bad / "two", "ct", "mri", ["x"])
    (bad / "two/ct/y.png").write_bytes(b"not a png")
    _png(bad / "two/mri/y.png", np.zeros((4, 4)))
    assert data.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "one  [ivf: vi + ir]" in out and "two  [medical: ct + mri]" in out
    assert "1 names without a partner in ir/: lonely" in out
    assert "A/B size mismatch in 1 pairs: b (24x20 vs 5x5)" in out
    assert "unreadable: y" in out and "3 problems" in out
    assert data.main(["check", str(tmp_path / "good/vi")]) == 1  # no layout


def test_check_on_shared_data(shared_data, capsys):
    assert data.main(["check", str(shared_data / "msrs")]) == 0
    out = capsys.readouterr().out
    assert "2 splits, 54 pairs, 0 problems" in out
    assert "train  [ivf: vi + ir]  34 pairs" in out and "vi: RGB 34 | ir: RGB R=G=B 34" in out


def test_train_iter_on_shared_msrs(shared_data):
    cfg = datasets.default_config("ivf")
    cfg.root, cfg.train = str(shared_data), ("msrs/train", "msrs_128/train")
    assert len(datasets.source_pairs(cfg, "train")) == 32 + 475
    b = next(data.make_train_iter(cfg, global_batch=8, seed=0, mesh=parallel.make_mesh()))
    assert b["vis"].shape == (8, 128, 128, 3) and b["ir"].shape == (8, 128, 128, 1)


def test_transforms_pickle_for_worker_processes(tmp_path):
    _coded_pair(tmp_path, 20, 20)
    rec = {"a": str(tmp_path / "vi/p.png"), "b": str(tmp_path / "ir/p.png"),
           "text_emb": np.zeros(4, np.float32), "weights": np.ones(5, np.float32)}  # fmt: skip
    load, crop = pickle.loads(pickle.dumps((data.LoadPair(), data.RandomCropFlip(8))))
    out = crop.random_map(load.map(rec), np.random.default_rng(0))
    assert out["vis"].shape == (8, 8, 3)
