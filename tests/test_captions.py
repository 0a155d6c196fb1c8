"""Event names, caption parsing, CLIP strings, the degradation captioner, the VLM script."""

import importlib.util
import pathlib

import numpy as np
import pytest
from PIL import Image

from dtpf_jax import captions, datasets, images
from dtpf_jax.losses import IVF_TASK_WEIGHTS, MED_TASK_WEIGHTS

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
    assert captions.normalize_event(name, kind, description) == key


def test_parse_caption_tolerates_blank_lines_markdown_and_wrapping():
    caption = (
        "Event Type: Low Light\r\nDescription: The scene is dark.\r\n\r\n"
        "**Event Type:** Overexposure\n\n**Description:** The sky is\nclipped.\n"
        "2. Event Type: Foggy\nDescription: haze\n"
        "Event Type: Motion Blur\n"
    )
    recs = captions.parse_caption(caption)
    assert [(r.event, r.key) for r in recs] == [
        ("Low Light", "low_light"),
        ("Overexposure", "over_exposure"),
        ("Foggy", None),
        ("Motion Blur", "motion_blur"),
    ]
    assert recs[1].description == "The sky is clipped." and recs[3].description == ""
    assert (
        captions.parse_caption("") == [] and captions.parse_caption("The image looks fine.\n") == []
    )


def test_clip_string_template_truncates_like_the_official_code():
    recs = captions.parse_caption(
        "Event Type: Low Light\nDescription: dark\nEvent Type: High Noise\n"
    )
    s, kept = captions.clip_string(recs)
    assert s == (
        "Event Type: Low Light\nDescription: This image has Low Light condition.\n"
        "Event Type: High Noise\nDescription: This image has High Noise condition."
    )
    many = captions.parse_caption("".join(f"Event Type: Event Number {i}\n" for i in range(9)))
    s, kept = captions.clip_string(many)
    assert len(s.split()) <= 70 and 1 < len(kept) < 9 and kept == many[: len(kept)]
    huge = captions.parse_caption("Event Type: " + "very " * 80 + "bad\n")
    s, kept = captions.clip_string(huge)
    assert s.endswith("\nDescription: Image degraded.") and len(kept) == 1
    s, _ = captions.clip_string(recs, "full")
    assert s == "Event Type: Low Light\nDescription: dark\nEvent Type: High Noise\nDescription: "


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_captioner_refuses_the_shared_folder(shared_dir, tmp_path):
    with pytest.raises(images.DataError, match="refusing to write"):
        captions.caption_tree(tmp_path, shared_dir / "data" / "captions")


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
    path = datasets.DATA_ROOT + "/roadscene"
    try:
        return images.read_image(f"{path}/vi/FLIR_00006.jpg", "RGB"), images.read_image(
            f"{path}/ir/FLIR_00006.jpg", "L"
        )
    except images.DataError:
        rng = np.random.default_rng(1)
        return np.stack([_scene(rng)] * 3, -1).astype(np.uint8), _scene(rng).astype(np.uint8)


def _med_pair():
    path = datasets.DATA_ROOT + "/harvard/ct_mri/test"
    try:
        return images.read_image(f"{path}/ct/16009.png", "RGB"), images.read_image(
            f"{path}/mri/16009.png", "L"
        )
    except images.DataError:
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
    return [k for k, _ in captions.detect_events(captions.measure_pair(a, b, kind), kind)]


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
            recs = captions.parse_caption(
                captions.caption_text([(key, "why")] if key != "default" else []), kind
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
    assert [r.key for r in captions.parse_caption(written)] == ["low_light", "over_exposure"]
    assert (tmp_path / "caps/d/y.png_y.png.txt").read_text() == ""
