"""Captions: event names, caption files, the strings CLIP reads; the degradation captioner."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from ml_collections import ConfigDict

from dtpf_jax.datasets import Pair, find_splits, relative_split, split_pairs
from dtpf_jax.images import DataError, abbreviate, read_image, refuse_shared
from dtpf_jax.losses import TASK_TABLES

log = logging.getLogger(__name__)

TEMPLATE_MAX_WORDS = 70  # official truncate_text_batch: drop events from the end past 70 words

# --- event names ------------------------------------------------------------------------------

_IR_WORDS = {"ir", "infrared", "thermal", "lwir"}
_VIS_WORDS = {"visible", "vis", "rgb", "color", "colour"}
_VIS_PHRASE = re.compile(r"\bvisible[\s-]+(image|light|band|photo)|\brgb\b|\bcolou?r image", re.I)
_FILLER = _IR_WORDS | _VIS_WORDS | {"image", "in", "of", "the", "condition", "in_image"}


def _aliases(spec: dict[str, str]) -> dict[str, str]:
    return {alias: key for key, names in spec.items() for alias in [key, *names.split()]}


# Event core (name words minus context words) -> table key; NOISE/CONTRAST split by context.
_IVF_ALIASES = _aliases(
    {
        "low_light": "lowlight low_illumination low_lighting dim_light dark darkness night"
        " nighttime underexposure under_exposure underexposed insufficient_light poor_lighting",
        "over_exposure": "overexposure overexposed over_exposed glare high_exposure strong_light"
        " excessive_brightness saturation",
        "CONTRAST": "low_contrast contrast poor_contrast lack_contrast ir_low_contrast",
        "NOISE": "noise high_noise noisy heavy_noise sensor_noise gaussian_noise grain graininess",
        "motion_blur": "blur blurry blurring blurred defocus defocus_blur out_of_focus"
        " camera_shake",
        "sensor_artifact": "sensor_artifacts artifact artifacts artefact artefacts stripe stripes"
        " stripe_noise striping banding fixed_pattern_noise",
    }
)
_MED_ALIASES = _aliases(
    {
        "contrast_enhancement": "low_contrast contrast contrast_enhance",
        "edge_preservation": "edge_enhancement edges edge",
        "noise_suppression": "noise noise_reduction denoising noisy",
        "detail_enhancement": "details detail detail_preservation fine_details",
        "structure_consistency": "structural_consistency structure_preservation structure",
        "artifact_reduction": "artefact_reduction artifact_removal artifacts artifact",
    }
)
_DEFAULT_NAMES = {"default", "none", "normal", "no_degradation", "clear", "good_quality", "clean"}


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def normalize_event(name: str, kind: str = "ivf", description: str = "") -> str | None:
    """Task-table key of an event name ('Overexposure' -> 'over_exposure'); None if unknown."""
    table = TASK_TABLES[kind]
    words = _words(name)
    full = "_".join(words)
    if full in table:
        return full
    core = "_".join(w for w in words if w not in _FILLER)
    if core in _DEFAULT_NAMES or full in _DEFAULT_NAMES:
        return "default"
    key = (_IVF_ALIASES if kind == "ivf" else _MED_ALIASES).get(core)
    if key not in ("NOISE", "CONTRAST"):
        return key
    ir, vis = set(words) & _IR_WORDS, set(words) & _VIS_WORDS
    if not ir and not vis:  # the name does not say which image: ask the description
        ir = set(_words(description)) & _IR_WORDS
        vis = _VIS_PHRASE.search(description)  # "noise is visible" says nothing about the image
    if key == "NOISE":
        return "ir_noise" if ir and not vis else "high_noise"
    return None if vis and not ir else "ir_low_contrast"  # no key for a low-contrast visible image


# --- caption files ----------------------------------------------------------------------------

_FIELD = r"^[\s>*#\-•\d.)]*\**\s*{}\s*\**\s*[:：]\s*\**\s*(?P<v>.*?)\s*\**\s*$"
_EVENT_RE = re.compile(_FIELD.format(r"event[\s_]*type"), re.I)
_DESC_RE = re.compile(_FIELD.format(r"description"), re.I)


@dataclasses.dataclass(frozen=True)
class Record:
    """One `Event Type:` / `Description:` record; key = task-table key (None if unknown)."""

    event: str
    description: str
    key: str | None


def parse_caption(text: str, kind: str = "ivf") -> list[Record]:
    """Records of a caption; blank lines, bullets, bold and wrapped descriptions tolerated."""
    raw: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if m := _EVENT_RE.match(line):
            raw.append([m["v"], ""])
        elif raw and (m := _DESC_RE.match(line)):
            raw[-1][1] = (raw[-1][1] + " " + m["v"]).strip()
        elif raw and raw[-1][1]:
            raw[-1][1] += " " + line.strip()
    return [Record(e, d, normalize_event(e, kind, d)) for e, d in raw if e]


def caption_dir(captions: str | os.PathLike, split_rel: str) -> pathlib.Path:
    """Caption folder of a split: <captions>/<split_rel>, or its text/ subfolder (official)."""
    d = pathlib.Path(captions) / split_rel
    return d / "text" if (d / "text").is_dir() else d


def caption_file(folder: pathlib.Path, pair: Pair) -> pathlib.Path | None:
    """`<A file>_<B file>.txt` (official) or `<name>.txt` in `folder`; None if neither exists."""
    for name in (
        f"{pathlib.Path(pair.a).name}_{pathlib.Path(pair.b).name}.txt",
        f"{pair.name}.txt",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def clip_string(records: Sequence[Record], mode: str = "template") -> tuple[str, list[Record]]:
    """What CLIP reads for a caption, and the records it keeps (their events weight the loss).

    'template' follows the official truncate_text_batch: `Event Type: X` /
    `Description: This image has X condition.` per record, records dropped from the end while
    the text has more than 70 words. 'full' keeps the descriptions (the tokenizer cuts at 77).
    """
    if mode == "full":
        return "\n".join(
            f"Event Type: {r.event}\nDescription: {r.description}" for r in records
        ), list(records)
    if mode != "template":
        raise ValueError(f"text mode must be 'template' or 'full', not {mode!r}")
    kept = list(records)
    while kept:
        s = "\n".join(
            f"Event Type: {r.event}\nDescription: This image has {r.event} condition." for r in kept
        )
        if len(s.split()) <= TEMPLATE_MAX_WORDS:
            return s, kept
        if len(kept) == 1:
            return f"Event Type: {kept[0].event}\nDescription: Image degraded.", kept
        kept.pop()
    return "", []


def pair_texts(cfg: ConfigDict, pairs: Sequence[Pair]) -> tuple[list[str], list[list[str]]]:
    """CLIP string and event keys of each pair's caption; raises if caption files are missing."""
    strings, events, missing, bad, unknown = [], [], [], [], collections.Counter()
    for p in pairs:
        path = caption_file(caption_dir(cfg.captions, p.split), p)
        if path is None:
            missing.append(f"{p.split}/{p.name}")
            continue
        records = parse_caption(path.read_text(encoding="utf-8", errors="replace"), cfg.kind)
        if not records:
            bad.append(path.name)
        s, kept = clip_string(records, cfg.text_mode)
        unknown.update(r.event for r in kept if r.key is None)
        strings.append(s)
        events.append([r.key or "default" for r in kept])
    if missing:
        raise DataError(
            f"{len(missing)} pairs have no caption file under {cfg.captions}: "
            f"{abbreviate(missing)}; write them with "
            "`python -m dtpf_jax.text caption ROOT --out DIR`"
        )
    if bad:
        log.warning(
            "%d caption files are empty or have no `Event Type:` line (default weights, "
            "empty text): %s",
            len(bad),
            abbreviate(bad),
        )
    if unknown:
        log.warning(
            "%d caption records have event names outside the %s table, weighted as 'default': %s",
            sum(unknown.values()),
            cfg.kind,
            ", ".join(f"{e!r}×{n}" for e, n in unknown.most_common(8)),
        )
    return strings, events


# --- degradation captioner ----------------------------------------------------------------------
# Thresholds, chosen on ../shared/data (clean images stay below them) and checked on synthetic
# degradations of real images in tests/test_captions.py. "levels" are 8-bit gray levels.
LOW_LIGHT_MEAN = 0.20  # visible mean luma (0-1) below -> low_light
OVER_EXPOSED_FRACTION = 0.15  # fraction of visible luma >= 250 above -> over_exposure
OVER_EXPOSED_MEAN = 0.80  # ... or visible mean luma above
IR_LOW_CONTRAST_STD = 0.06  # IR standard deviation (0-1) below -> ir_low_contrast
VIS_NOISE_SIGMA = 6.0  # Immerkaer noise sigma of visible luma (levels) above -> high_noise
IR_NOISE_SIGMA = 5.0  # ... of the IR image above -> ir_noise
BLUR_SCORE = 0.53  # Crete-Roffet blur (0 sharp .. 1 flat) of visible luma above -> motion_blur
STRIPE_LEVELS = 3.0  # IR column-offset RMS (levels) above -> sensor_artifact
# Medical (A = CT/PET/SPECT luma, B = MRI; spreads on the foreground where either is > 12).
MED_LOW_CONTRAST_STD = 0.15  # min(A, B) spread (0-1) below -> contrast_enhancement
MED_NOISE_SIGMA = 3.5  # max(A, B) noise sigma (levels) above -> noise_suppression
MED_BLUR_SCORE = 0.37  # A blur score above (soft functional image) -> detail_enhancement
MED_EDGE_DENSITY = 0.65  # MRI foreground fraction with Sobel > 100 above -> edge_preservation
MED_GRAD_CORR = -0.22  # A/B gradient-magnitude correlation below -> structure_consistency
MED_STRIPE_LEVELS = 2.0  # max(A, B) column-offset RMS above -> artifact_reduction
MED_SATURATED = 0.40  # ... or saturated (>= 250) fraction of A's foreground above

# (event, statistic, "<" or ">", threshold, description); an event fires if any of its rows do.
IVF_RULES = (
    ("low_light", "a_mean", "<", LOW_LIGHT_MEAN, "visible mean luminance {:.2f}"),
    ("over_exposure", "a_clipped", ">", OVER_EXPOSED_FRACTION, "{:.0%} of visible pixels clipped"),
    ("over_exposure", "a_mean", ">", OVER_EXPOSED_MEAN, "visible mean luminance {:.2f}"),
    ("ir_low_contrast", "b_std", "<", IR_LOW_CONTRAST_STD, "infrared intensity spread {:.3f}"),
    ("high_noise", "a_noise", ">", VIS_NOISE_SIGMA, "visible noise sigma {:.1f} levels"),
    ("ir_noise", "b_noise", ">", IR_NOISE_SIGMA, "infrared noise sigma {:.1f} levels"),
    ("motion_blur", "a_blur", ">", BLUR_SCORE, "visible blur score {:.2f}"),
    ("sensor_artifact", "b_stripe", ">", STRIPE_LEVELS, "infrared column stripes {:.1f} levels"),
)
MED_RULES = (
    ("contrast_enhancement", "min_std", "<", MED_LOW_CONTRAST_STD, "foreground spread {:.2f}"),
    ("noise_suppression", "max_noise", ">", MED_NOISE_SIGMA, "noise sigma {:.1f} levels"),
    ("detail_enhancement", "a_blur", ">", MED_BLUR_SCORE, "first-image blur score {:.2f}"),
    ("edge_preservation", "b_edges", ">", MED_EDGE_DENSITY, "MRI edge density {:.2f}"),
    ("structure_consistency", "grad_corr", "<", MED_GRAD_CORR, "edge correlation {:.2f}"),
    ("artifact_reduction", "max_stripe", ">", MED_STRIPE_LEVELS, "column stripes {:.1f} levels"),
    (
        "artifact_reduction",
        "a_saturated",
        ">",
        MED_SATURATED,
        "{:.0%} of the first image saturated",
    ),
)
# Names the captioner writes; the official parser maps them to the same keys.
EVENT_NAMES = {
    **{k: k.replace("_", " ").title() for k in TASK_TABLES["ivf"]},
    **{k: k.replace("_", " ").title() for k in TASK_TABLES["medical"]},
    "ir_low_contrast": "IR Low Contrast",
    "ir_noise": "IR Noise",
    "default": "Normal",
}


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of a uint8 RGB image as float64 levels (gray passes through)."""
    x = np.asarray(rgb, np.float64)
    return x if x.ndim == 2 else x @ np.array([0.299, 0.587, 0.114])


def _sobel(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(g, 1, mode="edge")
    gx = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]
    gy = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]
    return gx, gy


def noise_sigma(g: np.ndarray, edge_quantile: float = 0.9) -> float:
    """Immerkaer's fast noise sigma (levels), leaving out the 10 % strongest-gradient pixels."""
    g = np.asarray(g, np.float64)
    d2 = g[:, :-2] - 2 * g[:, 1:-1] + g[:, 2:]  # the 3x3 mask is [1,-2,1] x [1,-2,1]
    r = d2[:-2] - 2 * d2[1:-1] + d2[2:]
    gx, gy = _sobel(g)
    mag = (np.abs(gx) + np.abs(gy))[1:-1, 1:-1]
    keep = mag <= np.quantile(mag, edge_quantile)
    return float(np.sqrt(np.pi / 2) / 6 * np.abs(r[keep]).mean())


def blur_score(g: np.ndarray, k: int = 9) -> float:
    """Crete-Roffet no-reference blur: how little a k-tap box blur removes (max of x and y)."""
    g, scores = np.asarray(g, np.float64), []
    for ax in (0, 1):
        pad = [(k // 2, k // 2) if a == ax else (0, 0) for a in (0, 1)]
        c = np.cumsum(np.pad(g, pad, "edge"), ax)
        c = np.concatenate([np.zeros_like(c.take([0], ax)), c], ax)
        b = (c.take(range(k, g.shape[ax] + k), ax) - c.take(range(g.shape[ax]), ax)) / k
        d_f, d_b = np.abs(np.diff(g, axis=ax)), np.abs(np.diff(b, axis=ax))
        s_f = d_f.sum()
        scores.append((s_f - np.maximum(0, d_f - d_b).sum()) / s_f if s_f > 0 else 1.0)
    return float(max(scores))


def stripe_score(g: np.ndarray) -> float:
    """RMS over columns of the median (over rows) horizontal step: column offsets in levels."""
    steps = np.median(np.diff(np.asarray(g, np.float64), axis=1), axis=0)
    return float(np.sqrt(np.mean(steps**2)))


def measure_pair(a: np.ndarray, b: np.ndarray, kind: str) -> dict[str, float]:
    """Statistics of a uint8 pair (A RGB, B gray) that the event rules read."""
    ya, yb = luma(a), np.asarray(b, np.float64)
    m = dict(a_noise=noise_sigma(ya), b_noise=noise_sigma(yb), a_blur=blur_score(ya))
    m |= dict(a_stripe=stripe_score(ya), b_stripe=stripe_score(yb))
    if kind == "ivf":
        return m | dict(a_mean=ya.mean() / 255, a_clipped=(ya >= 250).mean(), b_std=yb.std() / 255)
    fg = np.maximum(ya, yb) > 12
    fg = fg if fg.sum() > 16 else np.ones_like(fg)
    ga, gb = (np.hypot(*_sobel(y))[fg] for y in (ya, yb))
    corr = float(np.corrcoef(ga, gb)[0, 1]) if ga.std() > 0 and gb.std() > 0 else 0.0
    return m | dict(
        min_std=min(ya[fg].std(), yb[fg].std()) / 255,
        max_noise=max(m["a_noise"], m["b_noise"]),
        max_stripe=max(m["a_stripe"], m["b_stripe"]),
        b_edges=(gb > 100).mean(),
        grad_corr=corr,
        a_saturated=(ya[fg] >= 250).mean(),
    )


def detect_events(m: dict[str, float], kind: str) -> list[tuple[str, str]]:
    """(table key, description) of each event whose threshold the measurements cross."""
    found: dict[str, str] = {}
    for key, stat, op, thr, text in IVF_RULES if kind == "ivf" else MED_RULES:
        if key not in found and (m[stat] < thr if op == "<" else m[stat] > thr):
            found[key] = f"Measured {text.format(m[stat])} ({op} {thr:g})."
    return list(found.items())


def caption_text(events: Sequence[tuple[str, str]]) -> str:
    """Official two-line records; no event -> one 'Normal' record (parsed as 'default')."""
    events = list(events) or [("default", "Measured no degradation above the thresholds.")]
    return "".join(f"Event Type: {EVENT_NAMES[k]}\nDescription: {d}\n" for k, d in events)


def caption_tree(root: str | os.PathLike, out: str | os.PathLike) -> dict[str, collections.Counter]:
    """Caption every pair under `root` into out/<split>/<A>_<B>.txt; event counts per split."""
    root, out = pathlib.Path(root), pathlib.Path(out)
    refuse_shared(out)
    counts = {}
    for split in find_splits(root):
        rel = relative_split(split, root)
        folder = out / rel
        folder.mkdir(parents=True, exist_ok=True)
        c = counts[rel] = collections.Counter()
        for p in split_pairs(split, root):
            events = detect_events(
                measure_pair(read_image(p.a, "RGB"), read_image(p.b, "L"), split.kind),
                split.kind,
            )
            c.update([k for k, _ in events] or ["default"])
            c["pairs"] += 1
            name = f"{pathlib.Path(p.a).name}_{pathlib.Path(p.b).name}.txt"
            (folder / name).write_text(caption_text(events), encoding="utf-8")
    return counts
