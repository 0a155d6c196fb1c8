"""Caption parsing, CLIP strings, tokenizer, tiny Flax CLIP + cache, captioner, VLM script."""

import hashlib
import importlib.util
import logging
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dtpf_jax import data, text
from dtpf_jax.losses import IVF_TASK_WEIGHTS, MED_TASK_WEIGHTS, task_weights

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, description, kind, key",
    [
        ("Overexposure", "", "ivf", "over_exposure"),
        ("Over Exposure", "", "ivf", "over_exposure"),
        ("Low Light", "", "ivf", "low_light"),
        ("Low Contrast", "The thermal image is flat.", "ivf", "ir_low_contrast"),
        ("Low Contrast (IR)", "", "ivf", "ir_low_contrast"),
        ("IR Low Contrast", "", "ivf", "ir_low_contrast"),
        ("Low Contrast", "The visible image is washed out.", "ivf", None),
        ("Noise", "Grain is visible in the infrared image.", "ivf", "ir_noise"),
        ("Noise", "The visible image is grainy.", "ivf", "high_noise"),
        ("High Noise", "", "ivf", "high_noise"),
        ("Infrared Noise", "", "ivf", "ir_noise"),
        ("motion-blur", "", "ivf", "motion_blur"),
        ("Sensor Artifacts", "", "ivf", "sensor_artifact"),
        ("Stripe Noise", "", "ivf", "sensor_artifact"),
        ("Normal", "", "ivf", "default"),
        ("Foggy", "", "ivf", None),
        ("Contrast Enhancement", "", "medical", "contrast_enhancement"),
        ("Structural Consistency", "", "medical", "structure_consistency"),
        ("Noise", "", "medical", "noise_suppression"),
        ("Artefact Reduction", "", "medical", "artifact_reduction"),
        ("Low Light", "", "medical", None),
    ],
)
def test_normalize_event(name, description, kind, key):
    assert text.normalize_event(name, kind, description) == key


def test_parse_caption_tolerates_blank_lines_markdown_and_wrapping():
    caption = (
        "Event Type: Low Light\r\nDescription: The scene is dark.\r\n\r\n"
        "**Event Type:** Overexposure\n\n**Description:** The sky is\nclipped.\n"
        "2. Event Type: Foggy\nDescription: haze\n"
        "Event Type: Motion Blur\n"
    )
    recs = text.parse_caption(caption)
    assert [(r.event, r.key) for r in recs] == [
        ("Low Light", "low_light"),
        ("Overexposure", "over_exposure"),
        ("Foggy", None),
        ("Motion Blur", "motion_blur"),
    ]
    assert recs[1].description == "The sky is clipped." and recs[3].description == ""
    assert text.parse_caption("") == [] and text.parse_caption("The image looks fine.\n") == []


def test_clip_string_template_truncates_like_the_official_code():
    recs = text.parse_caption("Event Type: Low Light\nDescription: dark\nEvent Type: High Noise\n")
    s, kept = text.clip_string(recs)
    assert s == (
        "Event Type: Low Light\nDescription: This image has Low Light condition.\n"
        "Event Type: High Noise\nDescription: This image has High Noise condition."
    )
    many = text.parse_caption("".join(f"Event Type: Event Number {i}\n" for i in range(9)))
    s, kept = text.clip_string(many)
    assert len(s.split()) <= 70 and 1 < len(kept) < 9 and kept == many[: len(kept)]
    huge = text.parse_caption("Event Type: " + "very " * 80 + "bad\n")
    s, kept = text.clip_string(huge)
    assert s.endswith("\nDescription: Image degraded.") and len(kept) == 1
    s, _ = text.clip_string(recs, "full")
    assert s == "Event Type: Low Light\nDescription: dark\nEvent Type: High Noise\nDescription: "


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
    assert text.main(["caption", str(root), "--out", str(caps)]) == 0
    files = sorted(p.name for p in (caps / "set").iterdir())
    assert files == ["a.png_a.png.txt", "b.png_b.png.txt", "c.png_c.png.txt"]
    assert "Event Type: Low Light" in (caps / "set/a.png_a.png.txt").read_text()
    (caps / "set/c.png_c.png.txt").write_text("Event Type: Foggy\nDescription: haze\n")
    args = ["embed", str(root), "--captions", str(caps), "--clip", str(tiny_clip)]
    assert text.main(args) == 0 and (caps / "clip_template.npz").is_file()
    cfg = data.default_config("ivf")
    cfg.update(root=str(root), train=("set",), train_split=(0, 1), crop=16, captions=str(caps))
    with caplog.at_level(logging.WARNING):
        b = next(data.make_train_iter(cfg, global_batch=3, seed=0))
    assert "'Foggy'×1" in caplog.text
    cache = text.load_cache(caps / "clip_template.npz")
    lookup = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    strings, events = text.pair_texts(cfg, data.source_pairs(cfg, "train"))
    want = {
        tuple(lookup[s]): task_weights(e, IVF_TASK_WEIGHTS)
        for s, e in zip(strings, events, strict=True)
    }
    for emb, w in zip(b["text_emb"], b["weights"], strict=True):
        np.testing.assert_array_equal(w, want[tuple(emb)])
    (caps / "set/b.png_b.png.txt").unlink()
    with pytest.raises(data.DataError, match="1 pairs have no caption file"):
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
    cfg = data.default_config("ivf")
    cfg.update(root=str(root), train=("set",), train_split=(0, 1), crop=16, captions=str(caps))
    pairs = data.source_pairs(cfg, "train")
    with pytest.raises(data.DataError, match="no embedding cache"):  # a teacher needs one
        text.pair_priors(cfg, pairs)
    run = ml_collections.ConfigDict({"stage": "student", "data": cfg.to_dict()})
    student_cfg = train.run_data_config(run)
    assert student_cfg.text_dim == 0 and cfg.text_dim == 512  # the run's copy, not the config
    emb, weights = text.pair_priors(student_cfg, pairs)
    assert emb.shape == (2, 0)
    np.testing.assert_array_equal(weights[1], IVF_TASK_WEIGHTS["motion_blur"])
    _, events = text.pair_texts(cfg, pairs)
    np.testing.assert_array_equal(weights[0], task_weights(events[0], IVF_TASK_WEIGHTS))
    run.stage = "teacher"
    assert train.run_data_config(run).text_dim == 512


def test_captioner_refuses_the_shared_folder(shared_dir, tmp_path):
    with pytest.raises(data.DataError, match="refusing to write"):
        text.caption_tree(tmp_path, shared_dir / "data" / "captions")


# --- captioner on synthetic degradations --------------------------------------------------------


def _scene(rng, h=96, w=128, medical=False):
    """A clean piecewise-smooth image with sharp-edged blocks, levels 30-220."""
    yy, xx = np.mgrid[:h, :w]
    img = 80 + 40 * xx / w + 20 * yy / h
    for _ in range(16):
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        img[y : y + rng.integers(8, 24), x : x + rng.integers(8, 24)] = rng.choice([30, 220])
    if medical:
        img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 > (0.45 * h) ** 2] = 0
    return img


def _ivf_pair():
    path = data.DATA_ROOT + "/roadscene"
    try:
        return data.read_image(f"{path}/vi/FLIR_00006.jpg", "RGB"), data.read_image(
            f"{path}/ir/FLIR_00006.jpg", "L"
        )
    except data.DataError:
        rng = np.random.default_rng(1)
        return np.stack([_scene(rng)] * 3, -1).astype(np.uint8), _scene(rng).astype(np.uint8)


def _med_pair():
    path = data.DATA_ROOT + "/harvard/ct_mri/test"
    try:
        return data.read_image(f"{path}/ct/16009.png", "RGB"), data.read_image(
            f"{path}/mri/16009.png", "L"
        )
    except data.DataError:
        rng = np.random.default_rng(2)
        a = _scene(rng, medical=True)
        return np.stack([a] * 3, -1).astype(np.uint8), _scene(rng, medical=True).astype(np.uint8)


def _noise(x, s=15.0):
    return x + np.random.default_rng(0).normal(0, s, x.shape)


def _stripes(x, s=8.0):
    return x + np.random.default_rng(0).normal(0, s, x.shape[1])[None, :]  # column offsets


def _box(x, kh, kw):
    k = np.ones((kh, kw)) / (kh * kw)
    pad = [(kh // 2, kh // 2), (kw // 2, kw // 2)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x.astype(np.float64), pad, mode="edge")
    return sum(
        k[i, j] * p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(kh) for j in range(kw)
    )


def _squash(x, f):
    return x.mean() + f * (x - x.mean())


IVF_CASES = {
    "low_light": lambda a, b: (a * 0.15, b),
    "over_exposure": lambda a, b: (a * 3.0, b),
    "ir_low_contrast": lambda a, b: (a, _squash(b, 0.15)),
    "high_noise": lambda a, b: (_noise(a), b),
    "ir_noise": lambda a, b: (a, _noise(b)),
    "motion_blur": lambda a, b: (_box(a, 1, 15), b),
    "sensor_artifact": lambda a, b: (a, _stripes(b)),
}
MED_CASES = {
    "noise_suppression": lambda a, b: (a, _noise(b, 12)),
    "detail_enhancement": lambda a, b: (_box(a, 9, 9), b),
    "contrast_enhancement": lambda a, b: (_squash(a, 0.3), b),
    "artifact_reduction": lambda a, b: (a, _stripes(b)),
}


def _events(a, b, kind):
    a, b = (np.clip(np.round(x), 0, 255).astype(np.uint8) for x in (a, b))
    return [k for k, _ in text.detect_events(text.measure_pair(a, b, kind), kind)]


@pytest.mark.parametrize(
    "kind, event", [("ivf", e) for e in IVF_CASES] + [("medical", e) for e in MED_CASES]
)
def test_captioner_detects_synthetic_degradations(kind, event):
    a, b = _ivf_pair() if kind == "ivf" else _med_pair()
    assert event not in _events(a, b, kind)
    degrade = (IVF_CASES if kind == "ivf" else MED_CASES)[event]
    assert event in _events(*degrade(a.astype(np.float64), b.astype(np.float64)), kind)


def test_caption_text_round_trips_through_the_parser():
    for kind, table in (("ivf", IVF_TASK_WEIGHTS), ("medical", MED_TASK_WEIGHTS)):
        for key in table:
            recs = text.parse_caption(
                text.caption_text([(key, "why")] if key != "default" else []), kind
            )
            assert [r.key for r in recs] == [key]
            # the official parser (lower-case, spaces -> '_') reads the same key
            assert recs[0].event.lower().replace(" ", "_") in (key, "normal")


# --- scripts/caption_vlm.py with a stub model ---------------------------------------------------


def _vlm_script():
    spec = importlib.util.spec_from_file_location("caption_vlm", REPO / "scripts/caption_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vlm_prompts_and_output_parsing_with_a_stub(tmp_path):
    vlm = _vlm_script()
    msgs = vlm.build_messages("medical")
    assert msgs[0]["role"] == "system" and "Structure Consistency" in msgs[0]["content"][0]["text"]
    assert [c["type"] for c in msgs[1]["content"]] == ["image", "image", "text"]
    assert "MRI" in msgs[1]["content"][2]["text"]
    assert "Sensor Artifact" in vlm.system_prompt("ivf")
    for name in ("x", "y"):
        _png(tmp_path / f"root/d/vi/{name}.png", np.zeros((8, 8, 3)))
        _png(tmp_path / f"root/d/ir/{name}.png", np.zeros((8, 8)))
    seen = []

    def stub(messages, images):
        seen.append((messages[1]["content"][2]["text"], [im.mode for im in images]))
        if len(seen) == 2:
            return "I cannot tell."
        return (
            "**Event Type:** Low Light\n\nDescription: Dark road.\n\n"
            "1. Event Type: Overexposure\nDescription: Glare.\n"
        )

    empty = vlm.caption_tree(tmp_path / "root", tmp_path / "caps", stub)
    assert empty == {"d": 1} and seen[0] == (vlm.USER_TEXT["ivf"], ["RGB", "RGB"])
    written = (tmp_path / "caps/d/x.png_x.png.txt").read_text()
    assert written == (
        "Event Type: Low Light\nDescription: Dark road.\n"
        "Event Type: Overexposure\nDescription: Glare.\n"
    )
    assert [r.key for r in text.parse_caption(written)] == ["low_light", "over_exposure"]
    assert (tmp_path / "caps/d/y.png_y.png.txt").read_text() == ""
