"""Tokenizer, tiny Flax CLIP + embedding cache, the `text` CLI, text priors in the pipeline."""

import hashlib
import logging
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dtpf_jax import captions, data, datasets, images, text
from dtpf_jax.losses import IVF_TASK_WEIGHTS, task_weights

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tokenizer_ids_and_vendored_vocabulary():
    bpe = REPO / "third_party/clip_bpe/bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.md5(bpe.read_bytes()).hexdigest() == "933b7abbbbde62c36f02f0e6ccde464f"
    assert (REPO / "third_party/clip_bpe/LICENSE").read_text().count("Copyright (c) 2021 OpenAI")
    tok = text.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> pathlib.Path:
    return text.make_random_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0)


def test_tiny_clip_embeddings_are_batched_and_distinct(tiny_clip):
    strings = ["Event Type: Low Light", "Event Type: High Noise", "", "Event Type: Low Light"]
    emb = text.embed_strings(strings, str(tiny_clip), batch=3)
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], emb[3], atol=1e-5)  # independent of batch position
    assert np.abs(emb[0] - emb[1]).max() > 1e-3 and np.abs(emb[0] - emb[2]).max() > 1e-3


def test_missing_clip_weights_give_one_clear_error(tmp_path):
    with pytest.raises(text.ClipError, match="--clip /path/to/clip-vit-base-patch32") as e:
        text.load_clip(str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)


def test_cache_reuse_and_invalidation(tiny_clip, tmp_path, monkeypatch):
    path, clip = tmp_path / "c.npz", str(tiny_clip)
    assert text.update_cache(path, ["a", "b", "a"], clip, "template") is False
    first = text.load_cache(path)
    assert first["strings"].tolist() == ["a", "b"] and first["embeddings"].shape == (2, 512)
    calls = []
    real = text.embed_strings
    monkeypatch.setattr(text, "embed_strings", lambda s, c: calls.append(list(s)) or real(s, c))
    assert text.update_cache(path, ["b", "a"], clip, "template") is True and calls == []
    assert text.update_cache(path, ["a", "c"], clip, "template") is False
    assert calls == [["c"]]  # only the new string is embedded; "b" is dropped
    second = text.load_cache(path)
    assert second["strings"].tolist() == ["a", "c"] and second["digest"] != first["digest"]
    np.testing.assert_array_equal(second["embeddings"][0], first["embeddings"][0])
    (tiny_clip / "config.json").touch()  # another checkpoint at the same path: recompute all
    assert text.update_cache(path, ["a", "c"], clip, "template") is False
    assert calls[-1] == ["a", "c"]


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_caption_embed_and_pipeline_end_to_end(tiny_clip, tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for n in ("a", "b", "c"):
        _png(root / "set/vi" / f"{n}.png", rng.integers(0, 60, (20, 20, 3)))  # dark
        _png(root / "set/ir" / f"{n}.png", rng.integers(0, 256, (20, 20)))
    caps = tmp_path / "caps"
    args = ["embed", str(root), "--captions", str(caps), "--clip", str(tiny_clip)]
    assert text.main(args) == 2  # no captions yet: one error line, not numpy's traceback
    assert text.main(["caption", str(root), "--out", str(caps)]) == 0
    files = sorted(p.name for p in (caps / "set").iterdir())
    assert files == ["a.png_a.png.txt", "b.png_b.png.txt", "c.png_c.png.txt"]
    assert "Event Type: Low Light" in (caps / "set/a.png_a.png.txt").read_text()
    (caps / "set/c.png_c.png.txt").write_text("Event Type: Foggy\nDescription: haze\n")
    (tmp_path / "other").mkdir()  # a caption tree of other splits only
    with pytest.raises(images.DataError, match=r"other: no captions of any pair under .*data; "):
        text.tree_strings(root, tmp_path / "other", "template")
    assert text.main(args) == 0 and (caps / "clip_template.npz").is_file()
    cfg = datasets.default_config("ivf")
    cfg.update(root=str(root), train=("set",), train_split=(0, 1), crop=16, captions=str(caps))
    with caplog.at_level(logging.WARNING):
        b = next(data.make_train_iter(cfg, global_batch=3, seed=0))
    assert "'Foggy'×1" in caplog.text
    cache = text.load_cache(caps / "clip_template.npz")
    lookup = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    strings, events = captions.pair_texts(cfg, datasets.source_pairs(cfg, "train"))
    want = {
        tuple(lookup[s]): task_weights(e, IVF_TASK_WEIGHTS)
        for s, e in zip(strings, events, strict=True)
    }
    for emb, w in zip(b["text_emb"], b["weights"], strict=True):
        np.testing.assert_array_equal(w, want[tuple(emb)])
    (caps / "set/b.png_b.png.txt").unlink()
    with pytest.raises(images.DataError, match="1 pairs have no caption file"):
        data.make_eval_pairs(cfg, "train")


def test_text_free_student_reads_caption_weights_without_an_embedding_cache(tmp_path):
    from dtpf_jax import train

    rng = np.random.default_rng(1)
    root, caps = tmp_path / "data", tmp_path / "caps"
    for n in ("a", "b"):
        _png(root / "set/vi" / f"{n}.png", rng.integers(0, 60, (20, 20, 3)))
        _png(root / "set/ir" / f"{n}.png", rng.integers(0, 256, (20, 20)))
    assert text.main(["caption", str(root), "--out", str(caps)]) == 0
    (caps / "set/b.png_b.png.txt").write_text("Event Type: Motion Blur\nDescription: x\n")
    cfg = datasets.default_config("ivf")
    cfg.update(root=str(root), train=("set",), train_split=(0, 1), crop=16, captions=str(caps))
    pairs = datasets.source_pairs(cfg, "train")
    with pytest.raises(images.DataError, match="no embedding cache"):  # a teacher needs one
        text.pair_priors(cfg, pairs)
    run = ml_collections.ConfigDict({"stage": "student", "data": cfg.to_dict()})
    student_cfg = train.run_data_config(run)
    assert student_cfg.text_dim == 0 and cfg.text_dim == 512  # the run's copy, not the config
    emb, weights = text.pair_priors(student_cfg, pairs)
    assert emb.shape == (2, 0)
    np.testing.assert_array_equal(weights[1], IVF_TASK_WEIGHTS["motion_blur"])
    _, events = captions.pair_texts(cfg, pairs)
    np.testing.assert_array_equal(weights[0], task_weights(events[0], IVF_TASK_WEIGHTS))
    run.stage = "teacher"
    assert train.run_data_config(run).text_dim == 512
