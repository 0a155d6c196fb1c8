"""Jitted fusion for any image size: reflect-pad to a shape bucket, run, crop back.

Modes: 'full' (the whole padded image at once), 'tiles' (the official sliding window: 128x128
tiles at stride 64, blended with a Gaussian of sigma 32) and 'large' (a big frame in a few
large tiles with linearly blended seams: bounded memory, close to 'full'; `tiling`). Padding
and cropping happen on the host, so the jitted network only ever sees bucket (or tile) shapes
and a folder of mixed sizes compiles once per bucket.

Library API (numpy / PIL in and out):

    from dtpf_jax import load_model, fuse_images
    fused = fuse_images(vis, ir)                        # shipped student (or untrained, warned)
    model = load_model("teacher.msgpack")               # or 'student', or any weight file
    fused = fuse_images(vis, ir, model, text="Event Type: Low Light ...", color="ycbcr")
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import unflatten_dict

from dtpf_jax import attention, networks, tiling
from dtpf_jax import color as colorspace
from dtpf_jax.networks import build_model

BUCKETS = ("coarse", "fine")
FINE_MULTIPLE = 32
# A new shape costs a compile: on this CPU the student's took 10-15 s (RoadScene shapes through
# fuse), 0.6-0.8 M pixels of its run time (~18 us a pixel), the teacher's longer; this errs
# towards fewer compiles. choose_buckets weighs compiles against padded pixels with it.
COMPILE_PIXELS = 1_500_000


def bucket_size(n: int, buckets: str = "coarse") -> int:
    """Padded length for n (the network takes any multiple of networks.SIZE_MULTIPLE).

    'coarse': a multiple of 64, and of 128 above 256 (few shapes, so few compiles, for a
    folder of mixed sizes; 480 pads to 512); 'fine': a multiple of 32 (least padding, a
    compile per distinct size; 480x640 runs as is).
    """
    if buckets == "fine":
        return max(FINE_MULTIPLE, math.ceil(n / FINE_MULTIPLE) * FINE_MULTIPLE)
    if buckets != "coarse":
        raise ValueError(f"unknown buckets {buckets!r}; use one of {', '.join(BUCKETS)}")
    m = max(64, math.ceil(n / 64) * 64)
    return math.ceil(m / 128) * 128 if m > 256 else m


def choose_buckets(sizes: Sequence[tuple[int, int]]) -> str:
    """'fine' or 'coarse' for a run over images of these (H, W) sizes, whichever costs less:
    compiles (COMPILE_PIXELS each, one per distinct padded shape) plus padded pixels run.

    A folder of one size (MSRS, M3FD, Harvard) gets 'fine'; RoadScene's hundreds of odd
    sizes get 'coarse' (11 shapes instead of ~60).
    """

    def cost(buckets: str) -> int:
        shapes = [(bucket_size(h, buckets), bucket_size(w, buckets)) for h, w in sizes]
        return len(set(shapes)) * COMPILE_PIXELS + sum(a * b for a, b in shapes)

    return "fine" if cost("fine") <= cost("coarse") else "coarse"


class Fuser:
    """Holds one jitted forward per model config; `trace_count` counts compilations."""

    def __init__(self, model_cfg: ml_collections.ConfigDict):
        self.model = build_model(model_cfg)
        self.text_dim = int(model_cfg.text_dim)
        self.trace_count = 0
        self._apply = jax.jit(self._forward)
        self._apply_collect = jax.jit(self._forward_collect)
        self._apply_global = jax.jit(self._forward_global)

    def _forward(self, params, vis, ir, text_emb):
        self.trace_count += 1  # runs only while tracing, i.e. once per new shape
        out = self.model.apply({"params": params}, vis, ir, text_emb)
        return jnp.clip(out.astype(jnp.float32), 0.0, 1.0)

    def _forward_collect(self, params, vis, ir, text_emb, mask):
        """Pass 1 of a tile that shares its frame's TSAB statistics (attention.FrameStats):
        each TSAB layer's sums over the pixels `mask` marks (the fused tile is not kept)."""
        self.trace_count += 1
        return self._frame_apply(params, vis, ir, text_emb, mask)[1]

    def _forward_global(self, params, vis, ir, text_emb, frame_sums):
        """Pass 2: the tile fused on the frame's sums (the tiles' pass-1 sums added up)."""
        self.trace_count += 1
        out, _ = self._frame_apply(params, vis, ir, text_emb, None, frame_sums)
        return jnp.clip(out.astype(jnp.float32), 0.0, 1.0)

    def _frame_apply(self, params, vis, ir, text_emb, mask, frame_sums=None):
        """model.apply inside attention.frame_stats: -> (fused, owned sums or None)."""
        variables = {"params": params}
        if frame_sums is not None:
            variables["tsab_global"] = frame_sums
        with attention.frame_stats(attention.FrameStats(mask)):
            if mask is None:
                return self.model.apply(variables, vis, ir, text_emb), None
            out, state = self.model.apply(variables, vis, ir, text_emb, mutable=["tsab_stats"])
        return out, state["tsab_stats"]

    def _text(self, text_emb, batch: int):
        if not self.text_dim:
            return None
        if text_emb is None:
            raise ValueError("this model is text-guided: pass a (B, 512) text embedding")
        t = np.asarray(text_emb, np.float32).reshape(-1, self.text_dim)
        return np.broadcast_to(t, (batch, self.text_dim)) if t.shape[0] == 1 else t

    def __call__(
        self,
        params,
        vis,
        ir,
        text_emb=None,
        mode: str = "full",
        tile_batch: int = 16,
        buckets: str = "coarse",
        progress: tiling.Progress | None = None,
        tile_pixels: int = tiling.LARGE_TILE_PIXELS,
        passes: int = 1,
    ):
        """vis (B, H, W, 3), ir (B, H, W, 1) float in [0, 1] -> fused (B, H, W, 3) in [0, 1].

        Mode 'full' pads to the shape bucket (`bucket_size`) of `buckets`; 'large' runs tiles
        of at most `tile_pixels`, in `passes` (1 or 2) runs over them: with 2, each tile runs
        on the frame's TSAB statistics, added up over the tiles by the first (tiling.FrameRun).
        progress(done, total) is called after each tile.
        """
        vis, ir = _as_batch(vis, 3), _as_batch(ir, 1)
        if vis.shape[:3] != ir.shape[:3]:
            raise ValueError(f"visible {vis.shape[1:3]} and infrared {ir.shape[1:3]} sizes differ")
        text = self._text(text_emb, vis.shape[0])
        if mode == "full":
            return self._full(params, vis, ir, text, buckets)
        run = functools.partial(self._apply, params)
        if mode == "tiles":
            return tiling.official_tiles(run, vis, ir, text, tile_batch, progress)
        if mode == "large":
            frame = None
            if passes == 2:
                frame = tiling.FrameRun(
                    functools.partial(self._apply_collect, params),
                    functools.partial(self._apply_global, params),
                )
            elif passes != 1:
                raise ValueError(f"passes must be 1 or 2, not {passes!r}")
            return tiling.large_tiles(
                run, vis, ir, text, tile_pixels, progress=progress, frame=frame
            )
        raise ValueError(f"unknown mode {mode!r}; use 'full', 'tiles' or 'large'")

    def _full(self, params, vis, ir, text, buckets):
        b, h, w, _ = vis.shape
        hp, wp = bucket_size(h, buckets), bucket_size(w, buckets)
        pad = tiling.reflect_pad
        out = self._apply(params, pad(vis, hp, wp), pad(ir, hp, wp), text)
        return np.asarray(out)[:, :h, :w]


def _as_batch(x, channels: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        x = x[None] if x.shape[-1] == channels else x[..., None]
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"expected (B, H, W, {channels}) images, got shape {x.shape}")
    return x


_FUSERS: dict[str, Fuser] = {}


def get_fuser(model_cfg: ml_collections.ConfigDict) -> Fuser:
    """One Fuser (hence one set of compiled shapes) per distinct model config."""
    key = model_cfg.to_json()
    if key not in _FUSERS:
        _FUSERS[key] = Fuser(model_cfg)
    return _FUSERS[key]


def make_fuse_fn(model_cfg: ml_collections.ConfigDict) -> Callable:
    """fuse(params, vis, ir, text_emb=None, mode='full') for batches of any H x W."""
    return get_fuser(model_cfg)


# --- library API: load_model / fuse_images -----------------------------------------------------

log = logging.getLogger("dtpf_jax")

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
# Students shipped in dtpf_jax/weights/, by the name load_model and `fuse --weights` take.
SHIPPED_STUDENTS = {
    "student": "student_ivf.msgpack",  # infrared-visible (MSRS); the default
    "student_ivf": "student_ivf.msgpack",
    "student_pet_mri": "student_pet_mri.msgpack",  # medical (Harvard), one per task
    "student_spect_mri": "student_spect_mri.msgpack",
    "student_ct_mri": "student_ct_mri.msgpack",
}
DEFAULT_STUDENT = SHIPPED_STUDENTS["student"]
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
UNTRAINED_WARNING = "no trained weights ship yet: output is from an untrained network"
# Above this many input pixels mode 'auto' runs large tiles: network memory then no longer
# grows with the image (env DTPF_MAX_FULL_PIXELS overrides; 0 = never switch).
MAX_FULL_PIXELS = 1 << 20
MODES = ("auto", "full", "tiles", "large")
COLORS = ("rgb", "ycbcr", "gray")


@dataclasses.dataclass
class Model:
    """Params and config of one fusion network and where they came from."""

    params: Any
    config: ml_collections.ConfigDict
    source: str
    meta: dict = dataclasses.field(default_factory=dict)
    trained: bool = True

    @property
    def text_guided(self) -> bool:
        return bool(self.config.text_dim)

    @property
    def fuser(self) -> Fuser:
        return get_fuser(self.config)


def random_params(model_cfg: ml_collections.ConfigDict, seed: int = 0):
    """Untrained params in PyTorch's default init, drawn with numpy.

    `networks.init_params` would compile the random initialisers of every tensor: about 90 s
    for the official student on 2 CPU cores, versus about 2 s of tracing here.
    """
    shapes = networks.param_shapes(model_cfg)
    rng, out = np.random.default_rng(seed), {}
    for path, leaf in sorted(shapes.items()):
        name, shape = path[-1], tuple(leaf.shape)
        kernel = shapes.get(path[:-1] + ("kernel",))
        if name == "kernel":  # depthwise (3, 3, C) kernels have fan-in 9
            out[path] = _uniform(rng, shape, 9 if len(shape) == 3 else math.prod(shape[:-1]))
        elif name == "bias" and kernel is not None:
            out[path] = _uniform(rng, shape, math.prod(kernel.shape[:-1]))
        elif name in ("weight", "temperature"):  # LayerNorm scales, attention temperatures
            out[path] = np.ones(shape, np.float32)
        elif name.startswith("rel_"):
            out[path] = (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
        else:
            out[path] = np.zeros(shape, np.float32)
    return unflatten_dict(out)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def load_model(weights: str | os.PathLike = "student", dtype: str | None = None) -> Model:
    """A shipped student by name, 'teacher' (an error: none ships) or a weight file.

    Names (SHIPPED_STUDENTS): 'student' / 'student_ivf' (infrared-visible, the default; an
    untrained one, warned, if the file is absent), 'student_pet_mri', 'student_spect_mri',
    'student_ct_mri' (medical, one per Harvard task; A = PET/SPECT/CT, B = MRI).
    `dtype` ('float32' | 'bfloat16') overrides the compute dtype stored in the file.
    """
    from dtpf_jax import checkpoint

    name = str(weights)
    shipped = WEIGHTS_DIR / SHIPPED_STUDENTS[name] if name in SHIPPED_STUDENTS else None
    if name == "teacher":
        raise checkpoint.WeightsError(
            "teacher: no teacher weights ship with dtpf_jax (the official teacher was never "
            "released); pass the path of a teacher weight file instead"
        )
    bare = pathlib.Path(name)  # no folder, no suffix, no such file: a mistyped shipped name
    if shipped is None and bare.name == name and not bare.suffix and not bare.exists():
        raise checkpoint.WeightsError(
            f"{name}: neither a shipped student ({', '.join(SHIPPED_STUDENTS)}) nor a "
            "weight file; pass one of those names or the path of a .msgpack file"
        )
    if shipped is not None and not shipped.is_file():
        if shipped.name != DEFAULT_STUDENT:
            raise checkpoint.WeightsError(
                f"{name}: {shipped} is missing from this install; reinstall dtpf_jax or pass "
                "the path of a weight file"
            )
        log.warning(UNTRAINED_WARNING)
        cfg = networks.model_config("student")
        params, source, meta, trained = random_params(cfg), "random init (student)", {}, False
    else:
        path = shipped if shipped is not None else weights
        params, cfg, meta = checkpoint.load_params(path)
        source, trained = str(path), True
    if dtype is not None:
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.dtype = jnp.dtype(dtype).name
    return Model(jax.device_put(params), cfg, source, meta, trained)


_DEFAULT_MODEL: Model | None = None


def default_model() -> Model:
    """load_model('student'), loaded once per process."""
    global _DEFAULT_MODEL
    if _DEFAULT_MODEL is None:
        _DEFAULT_MODEL = load_model("student")
    return _DEFAULT_MODEL


def max_full_pixels() -> int:
    """The 'auto' mode threshold: $DTPF_MAX_FULL_PIXELS, else MAX_FULL_PIXELS."""
    env = os.environ.get("DTPF_MAX_FULL_PIXELS", "").strip()
    return int(env) if env else MAX_FULL_PIXELS


def pick_mode(mode: str, height: int, width: int, threshold: int | None = None) -> str:
    """The mode an image runs in; 'auto' switches from 'full' to 'large' above the threshold."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    limit = max_full_pixels() if threshold is None else threshold
    return "large" if limit and height * width > limit else "full"


def apply_color(fused: np.ndarray, vis: np.ndarray, color: str) -> np.ndarray:
    """Network RGB (..., 3) -> 'rgb' as is, 'ycbcr' (fused luma + visible CbCr), 'gray' (...)."""
    if color == "rgb":
        return fused
    if color == "gray":
        return colorspace.rgb_to_gray(fused)[..., 0]
    if color == "ycbcr":
        y = colorspace.rgb_to_gray(fused)
        cbcr = colorspace.rgb_to_ycbcr(np.asarray(vis, np.float32))[..., 1:]
        return np.clip(colorspace.ycbcr_to_rgb(np.concatenate([y, cbcr], -1)), 0.0, 1.0)
    raise ValueError(f"unknown color {color!r}; use one of {', '.join(COLORS)}")


def text_embedding(model: Model, text, batch: int, clip: str = DEFAULT_CLIP):
    """(batch, text_dim) float32 for a text-guided model; None for the text-free student.

    `text`: a caption string, a list of `batch` strings, or CLIP embeddings (D,) / (B, D).
    """
    if not model.text_guided:
        if text is not None:
            raise ValueError("this model (the student) is text-free: pass no text")
        return None
    if text is None:
        raise ValueError(
            "this model is text-guided (a teacher): pass text='<caption>' or a "
            f"({model.config.text_dim},) CLIP text embedding"
        )
    if isinstance(text, str) or (
        isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text)
    ):
        from dtpf_jax.text import embed_strings  # imports transformers: only when needed

        strings = [text] if isinstance(text, str) else list(text)
        emb = embed_strings(strings, clip)
    else:
        emb = np.asarray(text, np.float32)
    emb = emb.reshape(-1, emb.shape[-1])
    if emb.shape[-1] != model.config.text_dim or emb.shape[0] not in (1, batch):
        raise ValueError(
            f"text embedding of shape {emb.shape} does not fit a batch of {batch} "
            f"and text_dim {model.config.text_dim}"
        )
    return np.broadcast_to(emb, (batch, emb.shape[-1])).astype(np.float32)


def fuse_images(
    vis,
    ir,
    model: Model | None = None,
    text=None,
    mode: str = "full",
    color: str = "rgb",
    clip: str = DEFAULT_CLIP,
    buckets: str = "coarse",
    progress: tiling.Progress | None = None,
    large_passes: int = 1,
):
    """Fuse one pair (PIL images, image file paths, (H, W[, C]) arrays) or a batch
    ((B, H, W, C) arrays).

    Visible / A: RGB, RGBA or gray; infrared / B: gray (RGB is turned into BT.601 luma).
    Arrays may be uint8, uint16 or float with finite values in [0, 1]; anything else raises
    saying what was passed. Returns PIL for PIL or path input, float32 in [0, 1] for float
    input, else uint8; (H, W, 3), or (H, W) for color='gray'.
    buckets: 'coarse' (default; few compiled shapes when called over images of many sizes)
    or 'fine' (less padding: faster for images of one size, e.g. 480x640 runs unpadded).
    mode: 'full', 'tiles', 'large' or 'auto' ('large' above MAX_FULL_PIXELS); progress(done,
    total) is called after each tile of 'tiles' and 'large'. large_passes: 1 or 2 runs
    over the large tiles; with 2, each tile runs on the whole frame's TSAB statistics.
    """
    from PIL import Image

    model = model or default_model()
    pil = isinstance(vis, Image.Image | str | os.PathLike)
    v, single = _as_images(vis, "RGB", "vis")
    i, _ = _as_images(ir, "L", "ir")
    floats = not pil and np.issubdtype(np.asarray(vis).dtype, np.floating)
    if v.shape[:3] != i.shape[:3]:
        raise ValueError(f"visible {v.shape[:3]} and infrared {i.shape[:3]} sizes differ")
    emb = text_embedding(model, text, v.shape[0], clip)
    run_mode = pick_mode(mode, v.shape[1], v.shape[2])
    fused = model.fuser(
        model.params,
        v,
        i,
        emb,
        mode=run_mode,
        buckets=buckets,
        progress=progress,
        passes=large_passes,
    )
    out = apply_color(fused, v, color)
    out = out[0] if single else out
    if floats:
        return out.astype(np.float32)
    out = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(out) if pil else out


_ACCEPTED = "a PIL image, an image file's path, or a uint8, uint16 or float array"


def _as_images(x, mode: str, role: str = "image") -> tuple[np.ndarray, bool]:
    """PIL / path / array -> float32 (B, H, W, 3 | 1) in [0, 1], and whether it was a single
    image; `role` ('vis', 'ir') names the argument in errors."""
    from PIL import Image

    if isinstance(x, str | os.PathLike):
        with Image.open(x) as img:  # FileNotFoundError names the path
            x = _pil_array(img, mode)
    elif isinstance(x, Image.Image):
        x = _pil_array(x, mode)
    elif not isinstance(x, np.ndarray | Sequence) and not hasattr(x, "__array__"):
        raise TypeError(f"{role}: got {type(x).__name__}; pass {_ACCEPTED}")
    a = np.asarray(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == bool or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        bad = np.size(a) - np.count_nonzero(np.isfinite(a))
        if bad:
            raise ValueError(
                f"{role}: {bad} of {a.size} values are NaN or infinite; float images must be "
                "finite, in [0, 1]"
            )
        if a.size and (a.min() < -1e-3 or a.max() > 1.0 + 1e-3):
            raise ValueError(
                f"{role}: float images must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]; "
                "divide 8-bit values by 255"
            )
    else:
        raise TypeError(f"{role}: got an array of dtype {a.dtype}; pass {_ACCEPTED}")
    shape, single = a.shape, a.ndim in (2, 3)
    if a.ndim == 2:
        a = a[..., None]
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{role}: expected (H, W[, C]) or (B, H, W, C) images, got shape {shape}")
    if 0 in a.shape:
        raise ValueError(f"{role}: an empty image, shape {shape}; pass at least 1x1 pixels")
    a = a[..., :3] if a.shape[-1] == 4 else a  # drop alpha
    if mode == "RGB":
        return (np.repeat(a, 3, -1) if a.shape[-1] == 1 else a), single
    return (colorspace.rgb_to_gray(a) if a.shape[-1] == 3 else a).astype(np.float32), single


def _pil_array(img, mode: str) -> np.ndarray:
    """PIL image -> uint8 'RGB' / 'L' array, 16-bit and palette/alpha as images.read_image."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / peak), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert(mode), dtype=np.uint8)
