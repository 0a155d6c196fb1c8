"""Fusion metrics in float64 numpy, as DTPF's Metric_Python computes them (../shared/METRICS.md).

A = visible, B = infrared, F = fused; the metric functions take 2-D gray arrays with integer
levels 0..255 (any dtype). Two calling conventions turn decoded images into those arrays:

* ``clean``: gray images through Pillow's ``convert('L')`` (the rounded BT.601 gray that
  `images.read_image(path, 'L')` gives); float inputs are rounded. EN and SF of the gray F.
* ``dtpf_table``: the official test.py (METRICS §4): float inputs truncated by
  ``int32(clip(x*255))``, every image seen as RGB (gray ones repeated, so the IR is too), gray =
  floor(0.2989 R + 0.5870 G + 0.1140 B) (weights sum to 0.9999, so equal channels v give v-1),
  EN of all R, G, B values of F pooled, SF from the channel and vertical differences of F.

Both keep DTPF's choices (METRICS §3): EN with its 1e-7 epsilon, MI in bits summed over the
sources, AG over (H-1)(W-1), VIF = VIFP(A,F) + VIFP(B,F), Qabf with the G = g_F quirk, Nabf with
w_min = 0, SSIM and MS-SSIM summed over the sources with an effective L = 1, PSNR with the
+48.13 dB offset and MSE on the [0, 1] scale. Results carry the convention's name (`Scores`).

Diagnostic, not a metric of the paper (`DIAGNOSTICS`; `evaluate` reports it beside them, as the
column IRT): **infrared transfer**, how much of the infrared's excess brightness over the visible
image a fusion brings in. Over the pixels in the top 5 % of the infrared image (at or above its
95th percentile) where the infrared is brighter than the visible luma Y (BT.601,
`color.rgb_to_gray` of the 8-bit levels), IRT = sum(Y_F - Y) / sum(ir - Y), Y_F the fused
image's luma; per image, then the mean over images. The visible image scores 0, max(Y, ir) 1,
a luma blend Y + k (max(Y, ir) - Y) k (before rounding to 8 bits); above 1 a fusion overshoots
the infrared there, below 0 it darkens what the infrared shows. An image with no such pixel
scores NaN (left out of means, an empty CSV cell). VIF, Qabf and MI reward a fusion that keeps
the visible image; IRT shows what it adds. The same under both conventions, on the 8-bit images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from dtpf_jax import color
from dtpf_jax.images import to_uint8

CONVENTIONS = ("clean", "dtpf_table")
METRICS = (
    "EN", "SD", "SF", "AG", "MI", "SCD", "CC", "VIF", "Qabf", "Nabf", "SSIM", "MS_SSIM", "PSNR",
    "MSE",
)  # fmt: skip
DIAGNOSTICS = ("IRT",)  # reported beside METRICS by `evaluate`; see the module docstring
IRT_TOP = 0.05  # infrared transfer looks at the brightest 5 % of the infrared image
LOWER_IS_BETTER = frozenset({"Nabf", "MSE"})
QUALITY_METRICS = ("SSIM", "VIF", "SD", "Qabf", "EN")
MIN_SIDE = 41  # the 4-scale VIFP needs 41 pixels to leave one valid pixel at its coarsest scale
MS_SSIM_MIN_SIDE = 161  # 11-tap window after 4 halvings (pytorch-msssim asserts > 160)
DTPF_GRAY_WEIGHTS = [0.2989, 0.5870, 0.1140]


class Scores(dict):
    """Metric name -> value, tagged with the convention that produced the values."""

    def __init__(self, values: Mapping[str, float], convention: str):
        super().__init__(values)
        self.convention = convention

    def __repr__(self) -> str:
        return f"Scores({dict.__repr__(self)}, convention={self.convention!r})"


def _gray_levels(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {x.shape}")
    return np.asarray(x, np.float64)


def _int_levels(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        if not np.array_equal(x, np.round(x)):
            raise ValueError("EN and MI need integer gray levels 0..255, got non-integer values")
    x = x.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"gray levels must lie in 0..255, got {x.min()}..{x.max()}")
    return x


def _plogp(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def entropy(f: np.ndarray, eps: float = 1e-7) -> float:
    """EN in bits of the integer levels of `f` (any shape: test.py pools R, G, B); DTPF's eps."""
    counts = np.bincount(_int_levels(f).ravel(), minlength=256)
    p = counts / counts.sum()
    if eps == 0:
        return _plogp(p)
    return float(-np.sum(p * np.log2(p + eps)))


def std_dev(f: np.ndarray) -> float:
    """SD: population standard deviation."""
    f = _gray_levels(f)
    return float(np.sqrt(np.sum((f - f.mean()) ** 2) / f.size))


def spatial_frequency(f: np.ndarray) -> float:
    """SF = sqrt(RF^2 + CF^2), each a mean over its own difference array."""
    f = _gray_levels(f)
    return float(np.sqrt(np.mean(np.diff(f, axis=0) ** 2) + np.mean(np.diff(f, axis=1) ** 2)))


def spatial_frequency_testpy(f_rgb: np.ndarray) -> float:
    """test.py's "SF" of an (H, W, 3) image: channel differences plus vertical differences."""
    f = np.asarray(f_rgb, np.float64)
    return float(np.sqrt(np.mean(np.diff(f, axis=2) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def average_gradient(f: np.ndarray) -> float:
    """AG with numpy.gradient differences, summed over all pixels / ((H-1)(W-1))."""
    f = _gray_levels(f)
    gy, gx = np.gradient(f)
    h, w = f.shape
    return float(np.sum(np.sqrt((gx**2 + gy**2) / 2)) / ((h - 1) * (w - 1)))


def mutual_information(x: np.ndarray, f: np.ndarray) -> float:
    """MI(X, F) in bits from the 256x256 joint histogram."""
    x, f = _int_levels(x).ravel(), _int_levels(f).ravel()
    joint = np.bincount(x * 256 + f, minlength=256 * 256).reshape(256, 256) / x.size
    return _plogp(joint.sum(1)) + _plogp(joint.sum(0)) - _plogp(joint.ravel())


def mi(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """MI = MI(A, F) + MI(B, F), bits."""
    return mutual_information(a, f) + mutual_information(b, f)


def _corr2(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))


def scd(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SCD = corr(F - B, A) + corr(F - A, B)."""
    a, b, f = _gray_levels(a), _gray_levels(b), _gray_levels(f)
    return _corr2(f - b, a) + _corr2(f - a, b)


def cc(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """CC = (corr(A, F) + corr(B, F)) / 2."""
    a, b, f = _gray_levels(a), _gray_levels(b), _gray_levels(f)
    return (_corr2(a, f) + _corr2(b, f)) / 2


def mse(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """MSE on the [0, 1] scale, averaged over the two sources."""
    a, b, f = (_gray_levels(x) / 255.0 for x in (a, b, f))
    return 0.5 * float(np.mean((f - a) ** 2)) + 0.5 * float(np.mean((f - b) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """PSNR = 20 log10(255 / sqrt(MSE on [0, 1])): textbook + 48.13 dB, as DTPF and Tang."""
    err = mse(a, b, f)
    return math.inf if err == 0 else 20 * math.log10(255 / math.sqrt(err))


def _correlate_valid(x: np.ndarray, k: np.ndarray, axis: int, step: int = 1) -> np.ndarray:
    """'valid' correlation of the stacked maps `x` (..., H, W) with the 1-D `k` along `axis`.

    With `step` > 1 only every step-th output is computed (the VIFP downsampling).
    """
    n = k.size
    if x.shape[axis] < n:
        raise ValueError(f"image side {x.shape[axis]} is smaller than the {n}-tap window")
    win = sliding_window_view(x, n, axis=axis)
    if axis == -2:
        return win[..., ::step, :, :] @ k
    # Each matmul must see rows with a proper leading dimension to run as a BLAS gemv: the
    # windows overlap along W, so put the output columns outside the matrix. 5x faster than
    # a loop over the taps.
    return np.swapaxes(np.swapaxes(win[..., ::step, :], -2, -3) @ k, -1, -2)


def _filter2(x: np.ndarray, k: np.ndarray, step: int = 1) -> np.ndarray:
    return _correlate_valid(_correlate_valid(x, k, -2, step), k, -1, step)


def _vif_window(n: int) -> np.ndarray:
    # fspecial('gaussian', n, n/5) is the outer product of this; none of its entries falls under
    # eps*max for these sizes, so the separable form is exact.
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x * x) / (2 * (n / 5) ** 2))
    return g / g.sum()


def _vifp_sums(refs: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-reference VIFP numerator and denominator summed over 4 scales; refs (R, H, W)."""
    sigma_nsq = 2.0
    nref = refs.shape[0]
    imgs = np.concatenate([refs, dist[None]], axis=0)
    num = np.zeros(nref)
    den = np.zeros(nref)
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        win = _vif_window(n)
        if scale > 1:
            imgs = _filter2(imgs, win, step=2)
        r, d = imgs[:nref], imgs[nref]
        stats = _filter2(np.concatenate([imgs, r * r, (d * d)[None], r * d], axis=0), win)
        mu1, mu2 = stats[:nref], stats[nref]
        s1 = np.maximum(stats[nref + 1 : 2 * nref + 1] - mu1 * mu1, 0)
        s2 = np.maximum(stats[2 * nref + 1] - mu2 * mu2, 0)
        s12 = stats[2 * nref + 2 :] - mu1 * mu2
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        flat1 = s1 < 1e-10
        g = np.where(flat1, 0, g)
        sv = np.where(flat1, s2, sv)
        s1 = np.where(flat1, 0, s1)
        flat2 = np.broadcast_to(s2 < 1e-10, g.shape)
        g = np.where(flat2, 0, g)
        sv = np.where(flat2, 0, sv)
        neg = g < 0
        sv = np.where(neg, s2, sv)
        g = np.where(neg, 0, g)
        sv = np.where(sv <= 1e-10, 1e-10, sv)
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)), axis=(-2, -1))
        den += np.sum(np.log10(1 + s1 / sigma_nsq), axis=(-2, -1))
    return num, den


def _check_vif_size(shape: tuple[int, ...]) -> None:
    if min(shape[-2:]) < MIN_SIDE:
        raise ValueError(f"VIF needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {shape[-2:]}")


def vifp(ref: np.ndarray, dist: np.ndarray) -> float:
    """Sheikh-Bovik multi-scale pixel VIF of `dist` against `ref` (0..255 scale)."""
    ref, dist = _gray_levels(ref), _gray_levels(dist)
    _check_vif_size(ref.shape)
    num, den = _vifp_sums(ref[None], dist)
    return float(num[0] / den[0])


def vif(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Fusion "VIF" = VIFP(A, F) + VIFP(B, F) (not Han's VIFF)."""
    a, b, f = _gray_levels(a), _gray_levels(b), _gray_levels(f)
    _check_vif_size(f.shape)
    num, den = _vifp_sums(np.stack([a, b]), f)
    return float(np.sum(num / den))


def _sobel_zero_pad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correlation with [[-1,0,1],[-2,0,2],[-1,0,1]] and [[1,2,1],[0,0,0],[-1,-2,-1]], zero pad."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    d = p[..., :, 2:] - p[..., :, :-2]
    sx = d[..., :-2, :] + 2 * d[..., 1:-1, :] + d[..., 2:, :]
    s = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    sy = s[..., :-2, :] - s[..., 2:, :]
    return sx, sy


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Xydeas-Petrovic Q^{AB/F} with the field's constants and its G = g_F quirk (METRICS 3.9)."""
    sx, sy = _sobel_zero_pad(np.stack([_gray_levels(a), _gray_levels(b), _gray_levels(f)]))
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(zero, np.pi / 2, np.arctan(sy / np.where(zero, 1, sx)))
        gs, gf = g[:2], g[2]
        # g_S == g_F gives G = g_F, not 1: the original MATLAB's quirk, kept by every port.
        rel = np.where(gs == gf, gf, np.minimum(gs, gf) / np.maximum(gs, gf))
    orient = 1 - np.abs(alpha[:2] - alpha[2]) / (np.pi / 2)
    q = 0.9994 / (1 + np.exp(-15 * (rel - 0.5))) * (0.9879 / (1 + np.exp(-22 * (orient - 0.8))))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sum(q * gs) / np.sum(gs))


def nabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Fusion artefacts N^{AB/F} (Shreyamsha Kumar's version, DTPF's w_min = 0); lower is better."""
    x = np.stack([_gray_levels(a), _gray_levels(b), _gray_levels(f)])
    p = np.pad(x, [(0, 0), (1, 1), (1, 1)], mode="reflect")
    d = p[..., :, 2:] - p[..., :, :-2]
    gv = (d[..., :-2, :] + 2 * d[..., 1:-1, :] + d[..., 2:, :]) / 8
    s = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    gh = (s[..., 2:, :] - s[..., :-2, :]) / 8
    g = np.sqrt(gh * gh + gv * gv)
    with np.errstate(divide="ignore", invalid="ignore"):
        # gh == 0 gives +-inf and +-pi/2, as in the reference; 0/0 is set to 0 below.
        alpha = np.where((gv == 0) & (gh == 0), 0, np.arctan(gv / gh))
        gs, gf = g[:2], g[2]
        low = np.minimum(gs, gf)
        rel = np.where(low == 0, 0, low / np.maximum(gs, gf))
    orient = np.abs(np.abs(alpha[:2] - alpha[2]) - np.pi / 2) * 2 / np.pi
    qg = 0.9999 / (1 + np.exp(-19 * (rel - 0.5)))
    qa = 0.9995 / (1 + np.exp(-22 * (orient - 0.5)))
    q = np.sqrt(qg * qa)
    w = np.where(gs >= 2, gs**1.5, 0)
    artefact = (gf > gs[0]) & (gf > gs[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sum(artefact * np.sum((1 - q) * w, axis=0)) / np.sum(w))


def _ssim_window() -> np.ndarray:
    """DTPF's 11-tap Gaussian (sigma 1.5) bit for bit, as torch builds it in float32 on a CPU.

    torch's float32 exp and sum come out correctly rounded here, numpy's float32 exp is one ulp
    off on two taps and its sum one ulp low. That matters: with a 2-D window summing to S,
    sigma^2 = E[x^2] - mu^2 picks up (S - S^2) mu^2; S - 1 was +1.2e-7 instead of DTPF's
    -6.1e-8, a shift of up to 1.2e-2 on 0..255 data against C2 = 9e-4 (L = 1). It cancels
    where F equals a source (gray max fusion), not where F differs from a nearly flat source
    (mean fusion): SSIM sums moved by up to 3.4e-3 on ../shared/metric_cases.
    """
    c = np.arange(11, dtype=np.float32) - 5
    g = np.exp((-(c * c) / np.float32(4.5)).astype(np.float64)).astype(np.float32)
    return (g / np.float32(g.sum(dtype=np.float64))).astype(np.float64)


def _ssim_cs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean SSIM and contrast-structure maps of x against y (stacked (..., H, W)), L = 1."""
    win = _ssim_window()
    c1, c2 = 0.01**2, 0.03**2
    x, y = np.broadcast_arrays(x, y)
    stats = np.stack([x, y, x * x, y * y, x * y])
    for axis in (-2, -1):
        # pytorch-msssim skips (with a warning) a dimension shorter than the window.
        if stats.shape[axis] >= win.size:
            stats = _correlate_valid(stats, win, axis)
    mu1, mu2, e11, e22, e12 = stats
    s1, s2, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    cs_map = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs_map
    return ssim_map.mean(axis=(-2, -1)), cs_map.mean(axis=(-2, -1))


def _avg_pool2(x: np.ndarray) -> np.ndarray:
    # torch avg_pool2d(kernel 2, padding = side % 2): an odd side gets a zero row/column on each
    # side, and the zeros count in the average.
    for axis in (-2, -1):
        if x.shape[axis] % 2:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (1, 1)
            x = np.pad(x, pad)
        n = x.shape[axis] // 2 * 2
        sl0 = [slice(None)] * x.ndim
        sl1 = [slice(None)] * x.ndim
        sl0[axis], sl1[axis] = slice(0, n, 2), slice(1, n, 2)
        x = (x[tuple(sl0)] + x[tuple(sl1)]) / 2
    return x


MS_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


def _ssim_and_ms_ssim(
    refs: np.ndarray, f: np.ndarray, multiscale: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-reference SSIM and (if asked and large enough) 5-scale MS-SSIM against f."""
    ssim0, cs = _ssim_cs(refs, f)
    if not multiscale or min(f.shape) < MS_SSIM_MIN_SIDE:
        return ssim0, None
    levels = [np.maximum(cs, 0)]
    imgs = np.concatenate([refs, f[None]])
    for level in range(1, 5):
        imgs = _avg_pool2(imgs)
        s, cs = _ssim_cs(imgs[:-1], imgs[-1])
        levels.append(np.maximum(s if level == 4 else cs, 0))
    ms = np.prod(np.stack(levels) ** MS_WEIGHTS[:, None], axis=0)
    return ssim0, ms


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """DTPF's SSIM of one pair: Gaussian 11/1.5, 'valid', effective L = 1 on 0..255 data."""
    return float(_ssim_cs(_gray_levels(x), _gray_levels(y))[0])


def ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """DTPF's 5-scale MS-SSIM of one pair (pytorch-msssim form); NaN below 161 pixels."""
    _, ms = _ssim_and_ms_ssim(_gray_levels(x)[None], _gray_levels(y), multiscale=True)
    return math.nan if ms is None else float(ms[0])


def _luma(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (float64, levels 0..255) of an (H, W[, 1 or 3]) image; gray stays gray."""
    img = np.asarray(img, np.float64)
    if img.ndim == 2:
        return img
    return np.asarray(color.rgb_to_gray(img))[..., 0]


def infrared_transfer(fused: np.ndarray, vis: np.ndarray, ir: np.ndarray, top=IRT_TOP) -> float:
    """IRT of one image (module docstring): sum(Y_F - Y) / sum(ir - Y) over the pixels in the
    top `top` fraction of `ir` (ir >= its 1 - top quantile) where ir > Y; NaN if none."""
    y, yf, b = _luma(vis), _luma(fused), _luma(ir)
    if not y.shape == yf.shape == b.shape:
        raise ValueError(f"fused, vis and ir differ in size: {yf.shape}, {y.shape}, {b.shape}")
    mask = (b >= np.quantile(b, 1 - top)) & (b > y)
    if not mask.any():
        return math.nan
    return float(np.sum(yf[mask] - y[mask]) / np.sum(b[mask] - y[mask]))


def gray_clean(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, 1 or 3]) -> Pillow's rounded BT.601 gray (what read_image(p, 'L') gives)."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img
    return np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).convert("L"))


def gray_dtpf(img: np.ndarray) -> np.ndarray:
    """test.py's preprocess_to_gray of an (H, W, 3) image: floor of 0.2989/0.5870/0.1140."""
    # np.dot, as the reference: a different summation order flips the floor of ~2e-5 of all
    # colours whose weighted sum is an exact integer.
    return np.dot(np.asarray(img, np.float64), DTPF_GRAY_WEIGHTS).astype(np.int32)


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got {img.shape}")
    return img


def _prepare(fused, vis, ir, convention: str):
    """Gray A, B, F for the metrics, and the array EN and SF see (gray F or RGB F)."""
    shapes = {np.shape(x)[:2] for x in (fused, vis, ir)}
    if len(shapes) != 1:
        raise ValueError(
            f"fused, vis and ir differ in size: {[np.shape(x) for x in (fused, vis, ir)]}"
        )
    if min(shapes.pop()) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE} (VIF's 4 scales)")
    if convention == "clean":
        a, b, f = (gray_clean(x).astype(np.float64) for x in (vis, ir, fused))
        return a, b, f, f
    if convention == "dtpf_table":
        # test.py reads the IR as gray and repeats it to 3 channels.
        ir_rgb = _as_rgb(gray_clean(ir))
        f_rgb = _as_rgb(fused)
        a, b, f = (gray_dtpf(x).astype(np.float64) for x in (_as_rgb(vis), ir_rgb, f_rgb))
        return a, b, f, f_rgb
    raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")


def evaluate_pair(
    fused: np.ndarray,
    vis: np.ndarray,
    ir: np.ndarray,
    convention: str = "clean",
    names: Sequence[str] | None = None,
) -> Scores:
    """METRICS (or the `names`, which may add DIAGNOSTICS) of one uint8 triple: fused (H,W[,3]),
    vis (H,W,3), ir (H,W)."""
    names = tuple(METRICS if names is None else names)
    unknown = set(names) - set(METRICS + DIAGNOSTICS)
    if unknown:
        known = ", ".join(METRICS + DIAGNOSTICS)
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {known}")
    a, b, f, f_raw = _prepare(fused, vis, ir, convention)
    # SSIM and MS-SSIM share their first scale: compute both at most once.
    both_ssim = functools.cache(lambda: _ssim_and_ms_ssim(np.stack([a, b]), f, "MS_SSIM" in names))
    compute = {
        "EN": lambda: entropy(f_raw),
        "SD": lambda: std_dev(f),
        "SF": lambda: spatial_frequency(f) if f_raw.ndim == 2 else spatial_frequency_testpy(f_raw),
        "AG": lambda: average_gradient(f),
        "MI": lambda: mi(a, b, f),
        "SCD": lambda: scd(a, b, f),
        "CC": lambda: cc(a, b, f),
        "VIF": lambda: vif(a, b, f),
        "Qabf": lambda: qabf(a, b, f),
        "Nabf": lambda: nabf(a, b, f),
        "SSIM": lambda: float(both_ssim()[0].sum()),
        "MS_SSIM": lambda: math.nan if both_ssim()[1] is None else float(both_ssim()[1].sum()),
        "PSNR": lambda: psnr(a, b, f),
        "MSE": lambda: mse(a, b, f),
        "IRT": lambda: infrared_transfer(fused, vis, ir),
    }
    return Scores({k: compute[k]() for k in METRICS + DIAGNOSTICS if k in names}, convention)


def to_levels(img: np.ndarray, convention: str) -> np.ndarray:
    """Float image in [0, 1] -> uint8 levels: test.py truncates (dtpf_table), clean rounds.

    uint8 input is taken as levels already and returned unchanged.
    """
    img = np.asarray(img)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    if img.dtype == np.uint8:
        return img
    if img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float32)
    if not np.all(np.isfinite(img)):
        raise ValueError("image has non-finite values")
    if convention == "clean":
        return to_uint8(img)
    # float32 arithmetic for float32 outputs, then truncation: exactly what test.py does.
    return np.clip(img * img.dtype.type(255), 0, 255).astype(np.uint8)


def evaluate_float(
    fused: np.ndarray,
    vis: np.ndarray,
    ir: np.ndarray,
    convention: str,
    names: Sequence[str] | None = None,
) -> Scores:
    """`evaluate_pair` for float images in [0, 1] (HWC), e.g. model outputs during validation."""
    return evaluate_pair(*(to_levels(x, convention) for x in (fused, vis, ir)), convention, names)


def quality(m: Mapping[str, float]) -> float:
    """DTPF's checkpoint-selection quality (SSIM + VIF + SD/45 + Qabf/0.70 + EN/6.75) / 5."""
    return (m["SSIM"] + m["VIF"] + m["SD"] / 45 + m["Qabf"] / 0.70 + m["EN"] / 6.75) / 5


def mean_scores(items: Iterable[Scores]) -> Scores:
    """Per-metric mean over images (NaN entries skipped); all items must share one convention."""
    items = list(items)
    if not items:
        raise ValueError("no scores to average")
    conventions = {s.convention for s in items}
    if len(conventions) > 1:
        raise ValueError(f"cannot average scores of different conventions {sorted(conventions)}")
    out = {}
    for k in items[0]:
        vals = np.array([s[k] for s in items], np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = float(vals.mean()) if vals.size else math.nan
    return Scores(out, conventions.pop())
