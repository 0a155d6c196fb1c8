"""Captions -> CLIP strings -> Flax CLIP embeddings (cached); degradation captioner; CLI."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
from ml_collections import ConfigDict

from dtpf_jax import data
from dtpf_jax.losses import TASK_TABLES, task_weights

log = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parents[1]
BPE_FILE = REPO / "third_party" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_TOKENS = 77
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


def caption_file(folder: pathlib.Path, pair: data.Pair) -> pathlib.Path | None:
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


def pair_texts(cfg: ConfigDict, pairs: Sequence[data.Pair]) -> tuple[list[str], list[list[str]]]:
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
        raise data.DataError(
            f"{len(missing)} pairs have no caption file under {cfg.captions}: "
            f"{data._short(missing)}; write them with "
            "`python -m dtpf_jax.text caption ROOT --out DIR`"
        )
    if bad:
        log.warning(
            "%d caption files are empty or have no `Event Type:` line (default weights, "
            "empty text): %s",
            len(bad),
            data._short(bad),
        )
    if unknown:
        log.warning(
            "%d caption records have event names outside the %s table, weighted as 'default': %s",
            sum(unknown.values()),
            cfg.kind,
            ", ".join(f"{e!r}×{n}" for e, n in unknown.most_common(8)),
        )
    return strings, events


def embeddings_path(cfg: ConfigDict) -> pathlib.Path:
    """The embedding cache the pipeline reads (cfg.embeddings or <captions>/clip_<mode>.npz)."""
    return pathlib.Path(cfg.embeddings or pathlib.Path(cfg.captions) / f"clip_{cfg.text_mode}.npz")


def pair_priors(cfg: ConfigDict, pairs: Sequence[data.Pair]) -> tuple[np.ndarray, np.ndarray]:
    """(N, text_dim) embeddings and (N, 5) task weights of pairs; no captions -> zeros, default.

    text_dim 0 (a text-free network): the captions set the task weights only and no embedding
    cache is read.
    """
    table = TASK_TABLES[cfg.kind]
    if not cfg.captions:
        log.info("no captions configured: zero text embeddings and 'default' weights")
        return (
            np.zeros((len(pairs), cfg.text_dim), np.float32),
            np.tile(task_weights([], table), (len(pairs), 1)),
        )
    strings, events = pair_texts(cfg, pairs)
    weights = np.stack([task_weights(e, table) for e in events])
    if not cfg.text_dim:
        return np.zeros((len(pairs), 0), np.float32), weights
    path = embeddings_path(cfg)
    cache = load_cache(path)
    lookup = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    lost = sorted(set(strings) - set(lookup))
    if lost:
        raise data.DataError(
            f"{path}: {len(lost)} caption strings have no cached embedding (e.g. {lost[0]!r}); run "
            f"`python -m dtpf_jax.text embed {cfg.root} --captions {cfg.captions} --mode "
            f"{cfg.text_mode} --clip PATH`"
        )
    emb = np.stack([lookup[s] for s in strings]).astype(np.float32)
    if emb.shape[1] != cfg.text_dim:
        raise data.DataError(
            f"{path}: embeddings are {emb.shape[1]}-d, data.text_dim is {cfg.text_dim}"
        )
    log.info("text embeddings from %s (model %s)", path, cache["model"])
    return emb, weights


# --- CLIP tokenizer, model, embedding cache -----------------------------------------------------


class ClipError(RuntimeError):
    """CLIP weights or vocabulary could not be found; the message says how to provide them."""


@functools.cache
def clip_tokenizer():
    """CLIPTokenizerFast built offline from the vendored BPE file (third_party/clip_bpe)."""
    from transformers import CLIPTokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    if not BPE_FILE.is_file():
        raise ClipError(f"{BPE_FILE} is missing; restore third_party/clip_bpe from the repository")
    merges = (
        gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (pathlib.Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizerFast(
            vocab_file=f"{d}/vocab.json",
            merges_file=f"{d}/merges.txt",
            model_max_length=CLIP_MAX_TOKENS,
        )


def load_clip(name_or_path: str):
    """FlaxCLIPTextModelWithProjection from a save_pretrained folder or a hub id."""
    from transformers import FlaxCLIPTextModelWithProjection

    try:
        return FlaxCLIPTextModelWithProjection.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ClipError(
            f"cannot load CLIP text model {name_or_path!r} ({type(e).__name__}); pass --clip "
            "/path/to/clip-vit-base-patch32 (a save_pretrained folder with config.json and "
            "flax_model.msgpack) or a hub id with network access; offline stand-in: "
            "`python -m dtpf_jax.text make-random-clip DIR`"
        ) from None


def embed_strings(strings: Sequence[str], clip: str, batch: int = 32) -> np.ndarray:
    """(N, projection_dim) unnormalised CLIP text embeddings, jitted at one fixed batch shape."""
    import jax

    model, tok = load_clip(clip), clip_tokenizer()
    fn = jax.jit(lambda p, ids, mask: model(ids, mask, params=p).text_embeds)
    out = []
    for i in range(0, len(strings), batch):
        chunk = list(strings[i : i + batch])
        enc = tok(
            chunk + [""] * (batch - len(chunk)),
            padding="max_length",
            truncation=True,
            max_length=CLIP_MAX_TOKENS,
            return_tensors="np",
        )
        out.append(
            np.asarray(fn(model.params, enc["input_ids"], enc["attention_mask"]))[: len(chunk)]
        )
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def model_id(clip: str) -> str:
    """Cache identity of a CLIP checkpoint: hub id, or folder + fingerprint of its files."""
    p = pathlib.Path(clip)
    if not p.is_dir():
        return clip
    h = hashlib.sha1()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.msgpack")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{p.resolve()}#{h.hexdigest()[:12]}"


def strings_digest(strings: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(sorted(set(strings))).encode()).hexdigest()


def load_cache(path: str | os.PathLike) -> dict:
    """The embedding cache: strings, embeddings, model, digest, mode."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise data.DataError(
            f"{path}: no embedding cache; run `python -m dtpf_jax.text embed ROOT "
            "--captions DIR --clip PATH`"
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: (z[k] if z[k].ndim else z[k].item()) for k in z.files}


def update_cache(path: str | os.PathLike, strings: Sequence[str], clip: str, mode: str) -> bool:
    """Embed the distinct strings into `path` unless it already holds them for this model.

    Returns True when the cache was reused unchanged; strings kept from a cache of the same
    model are not recomputed.
    """
    path, uniq, mid = pathlib.Path(path), sorted(set(strings)), model_id(clip)
    digest, old = strings_digest(uniq), {}
    if path.is_file():
        cache = load_cache(path)
        if cache["model"] == mid and cache["digest"] == digest:
            return True
        if cache["model"] == mid:
            old = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    todo = [s for s in uniq if s not in old]
    new = dict(zip(todo, embed_strings(todo, clip), strict=True)) if todo else {}
    emb = np.stack([new[s] if s in new else old[s] for s in uniq]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(
        tmp,
        strings=np.asarray(uniq, dtype=str),
        embeddings=emb,
        model=mid,
        digest=digest,
        mode=mode,
    )
    os.replace(tmp, path)
    return False


TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def make_random_clip(out_dir: str | os.PathLike, seed: int = 0, size: str = "tiny") -> pathlib.Path:
    """Write a random CLIP text tower + tokenizer; its embeddings are codes, not semantics.

    'tiny' = hidden 64, 2 layers; 'base' = the ViT-B/32 text config (63 M values, 242 MB).
    Weights N(0, 0.02), LayerNorm scales 1, biases 0, drawn with numpy from `seed`.
    """
    import jax
    from transformers import CLIPTextConfig, FlaxCLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, projection_dim=512, **(TINY_CLIP if size == "tiny" else {})
    )
    model = FlaxCLIPTextModelWithProjection(config, _do_init=False)
    shapes = jax.eval_shape(
        lambda key: model.init_weights(key, (1, CLIP_MAX_TOKENS)), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, float(name == "scale"), leaf.dtype)
        return rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)

    out = pathlib.Path(out_dir)
    model.save_pretrained(out, params=jax.tree_util.tree_map_with_path(fill, shapes))
    clip_tokenizer().save_pretrained(out)
    return out


# --- degradation captioner ----------------------------------------------------------------------
# Thresholds, chosen on ../shared/data (clean images stay below them) and checked on synthetic
# degradations of real images in tests/test_text.py. "levels" are 8-bit gray levels.
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


def refuse_shared(out: str | os.PathLike) -> None:
    """Raise DataError when `out` lies inside the read-only shared reference folder."""
    out = pathlib.Path(out).resolve()
    for shared in {(REPO.parent / "shared").resolve(), pathlib.Path("/work/shared").resolve()}:
        if out == shared or out.is_relative_to(shared):
            raise data.DataError(
                f"{out}: refusing to write inside {shared} (read-only reference "
                "data); pass --out elsewhere"
            )


def caption_tree(root: str | os.PathLike, out: str | os.PathLike) -> dict[str, collections.Counter]:
    """Caption every pair under `root` into out/<split>/<A>_<B>.txt; event counts per split."""
    root, out = pathlib.Path(root), pathlib.Path(out)
    refuse_shared(out)
    counts = {}
    for split in data.find_splits(root):
        rel = data.relative_split(split, root)
        folder = out / rel
        folder.mkdir(parents=True, exist_ok=True)
        c = counts[rel] = collections.Counter()
        for p in data.split_pairs(split, root):
            events = detect_events(
                measure_pair(data.read_image(p.a, "RGB"), data.read_image(p.b, "L"), split.kind),
                split.kind,
            )
            c.update([k for k, _ in events] or ["default"])
            c["pairs"] += 1
            name = f"{pathlib.Path(p.a).name}_{pathlib.Path(p.b).name}.txt"
            (folder / name).write_text(caption_text(events), encoding="utf-8")
    return counts


def tree_strings(root: str | os.PathLike, captions: str | os.PathLike, mode: str) -> list[str]:
    """CLIP strings of the captioned pairs under `root` (splits without captions skipped)."""
    root, strings = pathlib.Path(root), []
    for split in data.find_splits(root):
        rel = data.relative_split(split, root)
        if not caption_dir(captions, rel).is_dir():
            print(f"{rel}: no caption folder in {captions}, skipped")
            continue
        cfg = ConfigDict({"captions": str(captions), "kind": split.kind, "text_mode": mode})
        strings += pair_texts(cfg, data.split_pairs(split, root))[0]
    return strings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtpf_jax.text")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("caption", help="measure every pair under ROOT and write caption files")
    p.add_argument("root")
    p.add_argument("--out", required=True, help="caption tree to write (mirrors ROOT)")
    p = sub.add_parser("embed", help="cache the CLIP embedding of every distinct caption string")
    p.add_argument("root")
    p.add_argument("--captions", required=True, help="caption tree mirroring ROOT")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="folder or hub id")
    p.add_argument("--mode", default="template", choices=("template", "full"))
    p.add_argument("--out", help="cache file (default: <captions>/clip_<mode>.npz)")
    p = sub.add_parser("make-random-clip", help="write a random CLIP text tower (offline stand-in)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=("tiny", "base"))
    args = parser.parse_args(argv)
    data.show_info_logs("%(levelname)s %(message)s")
    try:
        if args.cmd == "caption":
            for rel, c in caption_tree(args.root, args.out).items():
                n = c.pop("pairs")
                print(f"{rel}: {n} pairs; " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        elif args.cmd == "embed":
            out = pathlib.Path(args.out or pathlib.Path(args.captions) / f"clip_{args.mode}.npz")
            refuse_shared(out)
            strings = tree_strings(args.root, args.captions, args.mode)
            reused = update_cache(out, strings, args.clip, args.mode)
            print(
                f"{out}: {len(set(strings))} distinct strings, {'reused' if reused else 'written'}"
            )
        else:
            refuse_shared(args.out)
            print(make_random_clip(args.out, args.seed, args.size))
    except (data.DataError, ClipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
