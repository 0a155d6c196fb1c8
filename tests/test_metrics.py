"""Fusion metrics: the METRICS.md worked example, properties, and a plain per-pixel reference.

The `plain_*` functions below are written from the definitions in ../shared/METRICS.md with
loops over pixels, independently of dtpf_jax/metrics.py; scripts/time_metrics.py times them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dtpf_jax import metrics
from dtpf_jax.images import read_image

# ---------------------------------------------------------------------------------------------
# Plain reference: straightforward loops, float64, gray images as nested indexing of 2-D arrays.


def plain_entropy(f, eps=1e-7):
    counts = [0] * 256
    for v in np.asarray(f).ravel().tolist():
        counts[int(v)] += 1
    n = sum(counts)
    return -sum(c / n * math.log2(c / n + eps) for c in counts)


def plain_sd(f):
    vals = np.asarray(f, float).ravel().tolist()
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def plain_sf(f):
    f = np.asarray(f, float).tolist()
    h, w = len(f), len(f[0])
    rf = sum((f[i + 1][j] - f[i][j]) ** 2 for i in range(h - 1) for j in range(w)) / ((h - 1) * w)
    cf = sum((f[i][j + 1] - f[i][j]) ** 2 for i in range(h) for j in range(w - 1)) / (h * (w - 1))
    return math.sqrt(rf + cf)


def plain_sf_testpy(rgb):
    f = np.asarray(rgb, float).tolist()
    h, w = len(f), len(f[0])
    ch = sum((f[i][j][c + 1] - f[i][j][c]) ** 2 for i in range(h) for j in range(w) for c in (0, 1))
    vert = sum(
        (f[i + 1][j][c] - f[i][j][c]) ** 2 for i in range(h - 1) for j in range(w) for c in range(3)
    )
    return math.sqrt(ch / (2 * h * w) + vert / (3 * (h - 1) * w))


def plain_ag(f):
    f = np.asarray(f, float).tolist()
    h, w = len(f), len(f[0])

    def diff(get, k, n):
        if k == 0:
            return get(1) - get(0)
        if k == n - 1:
            return get(n - 1) - get(n - 2)
        return (get(k + 1) - get(k - 1)) / 2

    total = 0.0
    for i in range(h):
        for j in range(w):
            gx = diff(lambda t, i=i: f[i][t], j, w)
            gy = diff(lambda t, j=j: f[t][j], i, h)
            total += math.sqrt((gx * gx + gy * gy) / 2)
    return total / ((h - 1) * (w - 1))


def plain_mutual_information(x, f):
    joint = [[0] * 256 for _ in range(256)]
    xs, fs = np.asarray(x).ravel().tolist(), np.asarray(f).ravel().tolist()
    for u, v in zip(xs, fs, strict=True):
        joint[int(u)][int(v)] += 1
    n = len(xs)
    px = [sum(row) / n for row in joint]
    pf = [sum(joint[i][j] for i in range(256)) / n for j in range(256)]

    def h(ps):
        return -sum(p * math.log2(p) for p in ps if p > 0)

    return h(px) + h(pf) - h([c / n for row in joint for c in row])


def plain_corr(x, y):
    xs, ys = np.asarray(x, float).ravel().tolist(), np.asarray(y, float).ravel().tolist()
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((u - mx) * (v - my) for u, v in zip(xs, ys, strict=True))
    sxx = sum((u - mx) ** 2 for u in xs)
    syy = sum((v - my) ** 2 for v in ys)
    return sxy / math.sqrt(sxx * syy)


def plain_mse(a, b, f):
    a, b, f = (np.asarray(x, float).ravel().tolist() for x in (a, b, f))
    n = len(f)
    e_a = sum((fv / 255 - av / 255) ** 2 for fv, av in zip(f, a, strict=True)) / n
    e_b = sum((fv / 255 - bv / 255) ** 2 for fv, bv in zip(f, b, strict=True)) / n
    return (e_a + e_b) / 2


def _window_2d(n, sigma, dtype=np.float64):
    """fspecial('gaussian') style: 2-D exp, tiny entries zeroed, normalised."""
    c = (n - 1) / 2
    win = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            win[i, j] = math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma * sigma))
    win[win < np.finfo(float).eps * win.max()] = 0
    return win / win.sum()


def _filter_valid(x, win):
    """One output per window position that fits inside x ('valid'), pixel by pixel."""
    n = win.shape[0]
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    out = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = np.sum(win * x[i : i + n, j : j + n])
    return out


def plain_vifp(ref, dist):
    ref, dist = np.asarray(ref, float), np.asarray(dist, float)
    num = den = 0.0
    for scale in (1, 2, 3, 4):
        n = 2 ** (5 - scale) + 1
        win = _window_2d(n, n / 5)
        if scale > 1:
            ref = _filter_valid(ref, win)[::2, ::2]
            dist = _filter_valid(dist, win)[::2, ::2]
        for i in range(ref.shape[0] - n + 1):
            for j in range(ref.shape[1] - n + 1):
                p, q = ref[i : i + n, j : j + n], dist[i : i + n, j : j + n]
                mu1, mu2 = np.sum(win * p), np.sum(win * q)
                s1 = max(np.sum(win * p * p) - mu1 * mu1, 0.0)
                s2 = max(np.sum(win * q * q) - mu2 * mu2, 0.0)
                s12 = np.sum(win * p * q) - mu1 * mu2
                g = s12 / (s1 + 1e-10)
                sv = s2 - g * s12
                if s1 < 1e-10:
                    g, sv, s1 = 0.0, s2, 0.0
                if s2 < 1e-10:
                    g, sv = 0.0, 0.0
                if g < 0:
                    sv, g = s2, 0.0
                sv = max(sv, 1e-10)
                num += math.log10(1 + g * g * s1 / (sv + 2))
                den += math.log10(1 + s1 / 2)
    return num / den


def _sobel_pixel(p, i, j, kernel):
    return sum(kernel[u][v] * p[i + u][j + v] for u in range(3) for v in range(3))


def plain_qabf(a, b, f):
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    ky = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    h, w = np.shape(f)
    grads = []
    for img in (a, b, f):
        p = np.pad(np.asarray(img, float), 1).tolist()
        g, al = np.empty((h, w)), np.empty((h, w))
        for i in range(h):
            for j in range(w):
                sx, sy = _sobel_pixel(p, i, j, kx), _sobel_pixel(p, i, j, ky)
                g[i, j] = math.sqrt(sx * sx + sy * sy)
                al[i, j] = math.pi / 2 if sx == 0 else math.atan(sy / sx)
        grads.append((g, al))
    (ga, aa), (gb, ab), (gf, af) = grads
    num = den = 0.0
    for i in range(h):
        for j in range(w):
            for gs, als in ((ga, aa), (gb, ab)):
                s, t = gs[i, j], gf[i, j]
                rel = t / s if s > t else (t if s == t else s / t)
                orient = 1 - abs(als[i, j] - af[i, j]) / (math.pi / 2)
                qg = 0.9994 / (1 + math.exp(-15 * (rel - 0.5)))
                qa = 0.9879 / (1 + math.exp(-22 * (orient - 0.8)))
                num += qg * qa * s
                den += s
    return num / den


def plain_nabf(a, b, f):
    kv = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    kh = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
    h, w = np.shape(f)
    grads = []
    for img in (a, b, f):
        img = np.asarray(img, float)
        # mirror padding without repeating the edge pixel
        rows = [1] + list(range(h)) + [h - 2]
        cols = [1] + list(range(w)) + [w - 2]
        p = [[img[r, c] for c in cols] for r in rows]
        g, al = np.empty((h, w)), np.empty((h, w))
        for i in range(h):
            for j in range(w):
                gv, gh = _sobel_pixel(p, i, j, kv) / 8, _sobel_pixel(p, i, j, kh) / 8
                g[i, j] = math.sqrt(gv * gv + gh * gh)
                if gv == 0 and gh == 0:
                    al[i, j] = 0.0
                elif gh == 0:
                    al[i, j] = math.copysign(math.pi / 2, gv)
                else:
                    al[i, j] = math.atan(gv / gh)
        grads.append((g, al))
    (ga, aa), (gb, ab), (gf, af) = grads
    num = den = 0.0
    for i in range(h):
        for j in range(w):
            t = gf[i, j]
            artefact = t > ga[i, j] and t > gb[i, j]
            for gs, als in ((ga, aa), (gb, ab)):
                s = gs[i, j]
                rel = 0.0 if s == 0 or t == 0 else min(s, t) / max(s, t)
                orient = abs(abs(als[i, j] - af[i, j]) - math.pi / 2) * 2 / math.pi
                q = math.sqrt(
                    0.9999
                    / (1 + math.exp(-19 * (rel - 0.5)))
                    * 0.9995
                    / (1 + math.exp(-22 * (orient - 0.5)))
                )
                wt = s**1.5 if s >= 2 else 0.0
                den += wt
                if artefact:
                    num += (1 - q) * wt
    return num / den


# The float32 Gaussian (11 taps, sigma 1.5) that DTPF's Metric_Python/ssim.py builds, as printed
# by torch 2.13 on a CPU (float.hex of `g / g.sum()`, g = exp(-(arange(11.) - 5)**2 / 4.5)).
DTPF_SSIM_HALF_WINDOW = ("0x1.0d957p-10", "0x1.f1fe02p-8", "0x1.26eb18p-5", "0x1.bff0fep-4",
                         "0x1.b43c3ep-3", "0x1.10656p-2")  # fmt: skip


def dtpf_ssim_window():
    half = [float.fromhex(h) for h in DTPF_SSIM_HALF_WINDOW]
    return np.array(half + half[-2::-1])


def _ssim_window_2d():
    g = dtpf_ssim_window()
    return np.outer(g, g)


def _plain_ssim_cs(x, y):
    win = _ssim_window_2d()
    c1, c2 = 1e-4, 9e-4
    h, w = x.shape[0] - 10, x.shape[1] - 10
    ssim_sum = cs_sum = 0.0
    for i in range(h):
        for j in range(w):
            p, q = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mu1, mu2 = np.sum(win * p), np.sum(win * q)
            s1 = np.sum(win * p * p) - mu1 * mu1
            s2 = np.sum(win * q * q) - mu2 * mu2
            s12 = np.sum(win * p * q) - mu1 * mu2
            cs = (2 * s12 + c2) / (s1 + s2 + c2)
            ssim_sum += (2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs
            cs_sum += cs
    return ssim_sum / (h * w), cs_sum / (h * w)


def plain_ssim(x, y):
    return _plain_ssim_cs(np.asarray(x, float), np.asarray(y, float))[0]


def _plain_pool(x):
    """2x2 average; an odd side is padded with one zero on each end first."""
    h, w = x.shape
    ph, pw = h % 2, w % 2
    p = np.zeros((h + 2 * ph, w + 2 * pw))
    p[ph : ph + h, pw : pw + w] = x
    out = np.empty((p.shape[0] // 2, p.shape[1] // 2))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (p[2 * i, 2 * j] + p[2 * i + 1, 2 * j] + p[2 * i, 2 * j + 1]) / 4
            out[i, j] += p[2 * i + 1, 2 * j + 1] / 4
    return out


def plain_ms_ssim(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if min(x.shape) <= 160:
        return math.nan
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    value = 1.0
    for level, wt in enumerate(weights):
        s, cs = _plain_ssim_cs(x, y)
        value *= max(s if level == 4 else cs, 0.0) ** wt
        x, y = _plain_pool(x), _plain_pool(y)
    return value


def plain_clean(a, b, f, multiscale=True):
    """All 14 metrics of gray A, B, F (0..255), plain loops; the clean convention."""
    mse = plain_mse(a, b, f)
    return {
        "EN": plain_entropy(f),
        "SD": plain_sd(f),
        "SF": plain_sf(f),
        "AG": plain_ag(f),
        "MI": plain_mutual_information(a, f) + plain_mutual_information(b, f),
        "SCD": plain_corr(np.subtract(f, b, dtype=float), a)
        + plain_corr(np.subtract(f, a, dtype=float), b),
        "CC": (plain_corr(a, f) + plain_corr(b, f)) / 2,
        "VIF": plain_vifp(a, f) + plain_vifp(b, f),
        "Qabf": plain_qabf(a, b, f),
        "Nabf": plain_nabf(a, b, f),
        "SSIM": plain_ssim(a, f) + plain_ssim(b, f),
        "MS_SSIM": plain_ms_ssim(a, f) + plain_ms_ssim(b, f) if multiscale else math.nan,
        "PSNR": 20 * math.log10(255 / math.sqrt(mse)),
        "MSE": mse,
    }


# ---------------------------------------------------------------------------------------------
# Synthetic images


def textured(h, w, seed, flat=True):
    """Smooth structure + noise + optional flat blocks: edges, texture and zero-variance areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 60 * np.sin(xx / (3 + seed)) * np.cos(yy / 5) + rng.normal(0, 12, (h, w))
    img[h // 3 : h // 2, :] = 128 + 40 * (xx[h // 3 : h // 2, :] > w // 2)
    if flat:
        img[: h // 4, : w // 4] = 37 + seed
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sources(h, w, seed=0):
    a = textured(h, w, seed)
    b = textured(h, w, seed + 1)
    # a max fusion copies each source in places, exercising Qabf's g_A == g_F branch
    f = np.maximum(a, b)
    f[h // 2 :, w // 2 :] = ((a.astype(int) + b + 1) // 2)[h // 2 :, w // 2 :]
    return a, b, f


# ---------------------------------------------------------------------------------------------
# Worked example (METRICS.md, FLIR_05767 / max_gray). Expected values as printed there; the
# allowed deviation is METRICS §7's tolerance plus half a unit of the last printed digit.

CLEAN = {
    "EN": "7.160773", "SD": "45.051051", "SF": "9.215721", "AG": "3.187121", "MI": "7.074201",
    "SCD": "1.110492", "CC": "0.806007", "VIF": "0.816650", "Qabf": "0.562098",
    "Nabf": "0.000240818", "SSIM": "1.011632", "MS_SSIM": "1.203767", "PSNR": "65.615888",
    "MSE": "0.017844",
}  # fmt: skip
TESTPY = {
    "SSIM": "0.984732", "EN": "7.160773", "MI": "6.557078", "SF": "6.662141", "SD": "45.051051",
    "AG": "3.187121", "CC": "0.806072", "SCD": "1.109768", "PSNR": "65.657058",
    "VIF": "0.802649", "Nabf": "0.00418856", "Qabf": "0.549779",
}  # fmt: skip
ABS_TOL = {"EN": 1e-6, "MI": 1e-6, "CC": 1e-6, "SCD": 1e-6, "PSNR": 1e-6, "Qabf": 1e-6,
           "Nabf": 1e-7, "SSIM": 1e-3, "MS_SSIM": 1e-3}  # fmt: skip
REL_TOL = {"SD": 1e-7, "SF": 1e-7, "AG": 1e-7, "MSE": 1e-7, "VIF": 1e-6}


def allowed(key: str, printed: str) -> float:
    half_unit = 0.5 * 10.0 ** -len(printed.split(".")[1])
    tol = ABS_TOL.get(key, 0.0) + REL_TOL.get(key, 0.0) * abs(float(printed))
    return tol + half_unit


def load_case(shared_dir, case, fused="fused_max_gray.png"):
    d = shared_dir / "metric_cases" / case
    if not d.is_dir():
        pytest.skip(f"{d} is not available")
    return (
        read_image(d / fused, "RGB"),
        read_image(d / "vis_rgb.png", "RGB"),
        read_image(d / "ir.png", "L"),
        read_image(d / "vis_gray.png", "L"),
    )


def check_expected(scores, expected):
    bad = {
        k: (scores[k], v, abs(scores[k] - float(v)))
        for k, v in expected.items()
        if not abs(scores[k] - float(v)) <= allowed(k, v)
    }
    assert not bad, f"metric (ours, METRICS.md, |diff|): {bad}"


@pytest.mark.parametrize("convention,expected", [("clean", CLEAN), ("dtpf_table", TESTPY)])
def test_worked_example(shared_dir, convention, expected):
    fused, vis, ir, _ = load_case(shared_dir, "FLIR_05767")
    scores = metrics.evaluate_pair(fused, vis, ir, convention)
    assert scores.convention == convention
    assert list(scores) == list(metrics.METRICS)
    check_expected(scores, expected)


def test_worked_example_clean_from_gray_files(shared_dir):
    # vis_gray.png is Pillow's convert('L') of vis_rgb.png, i.e. the clean convention's gray
    fused, vis, ir, vis_gray = load_case(shared_dir, "FLIR_05767")
    np.testing.assert_array_equal(metrics.gray_clean(vis), vis_gray)
    a, b, f = (x.astype(float) for x in (vis_gray, ir, metrics.gray_clean(fused)))
    got = {
        "EN": metrics.entropy(f), "SD": metrics.std_dev(f), "SF": metrics.spatial_frequency(f),
        "AG": metrics.average_gradient(f), "MI": metrics.mi(a, b, f),
        "SCD": metrics.scd(a, b, f), "CC": metrics.cc(a, b, f), "VIF": metrics.vif(a, b, f),
        "Qabf": metrics.qabf(a, b, f), "Nabf": metrics.nabf(a, b, f),
        "SSIM": metrics.ssim(a, f) + metrics.ssim(b, f),
        "MS_SSIM": metrics.ms_ssim(a, f) + metrics.ms_ssim(b, f),
        "PSNR": metrics.psnr(a, b, f), "MSE": metrics.mse(a, b, f),
    }  # fmt: skip
    check_expected(got, CLEAN)


def test_worked_example_other_numbers(shared_dir):
    fused, vis, ir, vis_gray = load_case(shared_dir, "FLIR_05767")
    a, b, f = (x.astype(float) for x in (vis_gray, ir, fused[..., 0]))
    # MI in nats (CDDFuse) is exactly ln 2 times ours; AG over H*W (CDDFuse); EN without eps
    assert abs(metrics.mi(a, b, f) * math.log(2) - 4.903462) < 1e-6
    h, w = f.shape
    assert abs(metrics.average_gradient(f) * (h - 1) * (w - 1) / (h * w) - 3.171528) < 1e-6
    assert abs(metrics.entropy(f, eps=0) - 7.160800) < 1e-6
    # Qabf on [0, 1] inputs drops through the G = g_F quirk (METRICS 3.9: 0.319513). Which
    # gradients come out exactly equal then depends on float rounding order, hence 1e-3.
    assert abs(metrics.qabf(a / 255, b / 255, f / 255) - 0.319513) < 1e-3
    # test.py's EN pools R, G and B of a colour output (max_rgb: 7.2528 pooled)
    rgb, *_ = load_case(shared_dir, "FLIR_05767", "fused_max_rgb.png")
    en = metrics.evaluate_pair(rgb, vis, ir, "dtpf_table", names=["EN"])["EN"]
    assert abs(en - 7.2528) < 5e-5


@pytest.mark.parametrize("case", ["FLIR_00006", "FLIR_06832"])
def test_other_cases_plausible(shared_dir, case):
    runs = [("fused_max_gray.png", c) for c in metrics.CONVENTIONS]
    for fused_file, convention in runs + [("fused_mean_gray.png", "dtpf_table")]:
        fused, vis, ir, _ = load_case(shared_dir, case, fused_file)
        s = metrics.evaluate_pair(fused, vis, ir, convention)
        assert all(math.isfinite(v) for v in s.values()), s
        assert 5 < s["EN"] < 8 and 10 < s["SD"] < 80 and 2 < s["SF"] < 30 and 1 < s["AG"] < 10
        assert 1 < s["MI"] < 16 and -2 < s["SCD"] < 2 and 0 < s["CC"] < 1
        assert 0.3 < s["VIF"] < 1.5 and 0.2 < s["Qabf"] < 0.8 and 0 <= s["Nabf"] < 0.05
        assert 0.5 < s["SSIM"] <= 2 and 0.5 < s["MS_SSIM"] <= 2
        assert 55 < s["PSNR"] < 75 and 0 < s["MSE"] < 0.2
        if "mean" in fused_file:
            # an average creates no artefacts and loses edges: MI well below the max fusion's
            assert s["Nabf"] < 1e-5 and s["MI"] < 4


# SSIM(A,F) + SSIM(B,F) as DTPF's own code (Metric_Python/ssim.py: torch, float32) gives it,
# printed by `python scripts/ssim_reference.py` (torch 2.13.0 CPU, 1 thread), column DTPF.
DTPF_TORCH_SSIM = {
    ("FLIR_00006", "max", "clean"): 0.922171, ("FLIR_00006", "mean", "clean"): 0.812877,
    ("FLIR_05767", "max", "clean"): 1.011632, ("FLIR_05767", "mean", "clean"): 1.072708,
    ("FLIR_06832", "max", "clean"): 0.899866, ("FLIR_06832", "mean", "clean"): 0.796080,
    ("FLIR_00006", "mean", "dtpf_table"): 0.809512,
    ("FLIR_05767", "max", "dtpf_table"): 0.984732, ("FLIR_05767", "mean", "dtpf_table"): 1.063488,
    ("FLIR_06832", "max", "dtpf_table"): 0.887335, ("FLIR_06832", "mean", "dtpf_table"): 0.792992,
}  # fmt: skip
# Not ("FLIR_00006", "max", "dtpf_table"): there A and F are flat, one level apart, near 252 in
# the sky, and DTPF's float32 variances on its 0..65025 scale are multiples of 256 against
# C2 = 58.5, so its value is rounding noise: 0.752161 through oneDNN, 0.937458 with
# torch.backends.mkldnn.enabled = False; the same code in float64 gives 0.895383, as we do.


@pytest.mark.parametrize("case", ["FLIR_00006", "FLIR_05767", "FLIR_06832"])
def test_ssim_matches_dtpf_torch_code(shared_dir, case):
    bad = {}
    for (name, fusion, convention), expected in DTPF_TORCH_SSIM.items():
        if name != case:
            continue
        fused, vis, ir, vis_gray = load_case(shared_dir, case, f"fused_{fusion}_gray.png")
        if convention == "clean":
            vis = vis_gray  # the 2-D gray arrays DTPF's SSIM_function then takes as they are
        got = metrics.evaluate_pair(fused, vis, ir, convention, names=["SSIM"])["SSIM"]
        if not abs(got - expected) < 5e-4:
            bad[fusion, convention] = (got, expected, got - expected)
    assert not bad, f"SSIM (ours, DTPF's torch code, diff): {bad}"


def test_ssim_window_is_dtpfs():
    # numpy's float32 exp and sum round differently from torch's: the window then sums to
    # 1 + 1.2e-7 in 2-D instead of 1 - 6.1e-8, enough to move SSIM by 1e-3 (METRICS 3.11).
    np.testing.assert_array_equal(metrics._ssim_window(), dtpf_ssim_window())


# ---------------------------------------------------------------------------------------------
# Vectorised vs plain


def test_matches_plain_small():
    a, b, f = sources(44, 47, seed=3)
    fast = metrics.evaluate_pair(f, np.repeat(a[..., None], 3, -1), b, "clean")
    slow = plain_clean(a, b, f, multiscale=False)
    for k, v in slow.items():
        if k == "MS_SSIM":
            assert math.isnan(fast[k])
            continue
        assert fast[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_pieces_match_plain_on_odd_inputs():
    a, b, f = sources(23, 26, seed=5)
    assert metrics.qabf(a, b, f) == pytest.approx(plain_qabf(a, b, f), rel=1e-12)
    assert metrics.nabf(a, b, f) == pytest.approx(plain_nabf(a, b, f), rel=1e-12)
    assert metrics.ssim(a, f) == pytest.approx(plain_ssim(a, f), rel=1e-9)
    # images that only differ by a constant: zero-variance windows and g < 0 paths in VIFP
    c = np.full((45, 50), 200, np.uint8)
    c[20:, 10:] = 90
    assert metrics.vifp(c, 255 - c) == pytest.approx(plain_vifp(c, 255 - c), rel=1e-9)
    t = textured(41, 25, 9).repeat(2, 1)
    assert metrics.vifp(t, c[:41]) == pytest.approx(plain_vifp(t, c[:41]), rel=1e-9)


def test_ms_ssim_matches_plain():
    x = textured(161, 166, seed=7)
    y = np.clip(x.astype(int) + textured(161, 166, seed=8) // 8 - 16, 0, 255)
    assert metrics.ms_ssim(x, y) == pytest.approx(plain_ms_ssim(x, y), rel=1e-9)
    assert math.isnan(metrics.ms_ssim(x[:160], y[:160]))


def test_testpy_sf_matches_plain():
    rgb = np.stack([textured(20, 17, s) for s in range(3)], -1)
    assert metrics.spatial_frequency_testpy(rgb) == pytest.approx(plain_sf_testpy(rgb), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties


def test_mi_of_copy_is_entropy_and_symmetric():
    a, b, _ = sources(40, 50)
    assert metrics.mutual_information(a, a) == pytest.approx(metrics.entropy(a, eps=0), abs=1e-12)
    assert metrics.mutual_information(a, b) == pytest.approx(metrics.mutual_information(b, a))
    assert 0 <= metrics.mutual_information(a, b) <= metrics.entropy(b, eps=0)
    # MI sees only the pairing of levels: relabelling F's levels changes nothing
    assert metrics.mutual_information(a, 255 - b) == pytest.approx(metrics.mutual_information(a, b))


def test_constant_and_uniform_images():
    c = np.full((48, 48), 77, np.uint8)
    # DTPF's 1e-7 inside the log gives -1.4e-7 rather than 0 (within EN's 1e-6 tolerance)
    assert metrics.entropy(c, eps=0) == 0 and abs(metrics.entropy(c)) < 1e-6
    assert metrics.std_dev(c) == 0
    assert metrics.spatial_frequency(c) == 0 and metrics.average_gradient(c) == 0
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert metrics.entropy(levels, eps=0) == pytest.approx(8.0, abs=1e-12)
    # DTPF's 1e-7 inside the log lowers EN slightly
    assert 8.0 - 1e-4 < metrics.entropy(levels) < 8.0


def test_ramp_sf_ag_and_psnr_offset():
    h, w, step = 50, 60, 3
    ramp = np.tile(np.arange(w) * step, (h, 1))
    assert metrics.spatial_frequency(ramp) == pytest.approx(step)
    assert metrics.average_gradient(ramp) == pytest.approx(
        step / math.sqrt(2) * h * w / ((h - 1) * (w - 1))
    )
    a, b, f = (x.astype(float) for x in sources(50, 60))
    mse_255 = 0.5 * np.mean((f - a) ** 2) + 0.5 * np.mean((f - b) ** 2)
    assert metrics.mse(a, b, f) == pytest.approx(mse_255 / 255**2)
    textbook = 10 * math.log10(255**2 / mse_255)
    assert metrics.psnr(a, b, f) == pytest.approx(textbook + 20 * math.log10(255))


def test_self_similarity():
    a, b, _ = sources(64, 64)
    assert metrics.vifp(a, a) == pytest.approx(1.0, abs=1e-9)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    x = textured(170, 180, 2)
    assert metrics.ms_ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # a copy of one source scores 1 + VIFP(other, F)
    assert metrics.vif(a, b, a) == pytest.approx(1 + metrics.vifp(b, a), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_in_sources_and_qabf_range(seed):
    a, b, f = sources(48, 52, seed)
    vis_a, vis_b = (np.repeat(x[..., None], 3, -1) for x in (a, b))
    ab = metrics.evaluate_pair(f, vis_a, b, "clean")
    ba = metrics.evaluate_pair(f, vis_b, a, "clean")
    for k in metrics.METRICS:
        if not math.isnan(ab[k]):
            assert ab[k] == pytest.approx(ba[k], rel=1e-12, abs=1e-15), k
    assert 0 <= ab["Qabf"] <= 1 and 0 <= ab["Nabf"] <= 1
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, a.shape)
    assert 0 <= metrics.qabf(a, b, noise) <= 1


def test_qabf_quirk_and_nabf_weights():
    a, b, _ = sources(40, 40)
    # F = A: every edge of A has g_A == g_F, so G = g_F instead of the intended 1. On 0..255
    # data g_F > 1 on edges and Q_g saturates; on [0, 1] data g_F is small and Q_g collapses.
    assert metrics.qabf(a, b, a) > metrics.qabf(a / 255, b / 255, a / 255) + 0.1
    # Nabf counts only pixels where F's gradient exceeds both sources'
    assert metrics.nabf(a, b, np.full_like(a, 9)) == 0
    assert metrics.nabf(a, b, np.random.default_rng(0).integers(0, 256, a.shape)) > 0.01


def test_dtpf_gray_and_conversions():
    v = np.arange(256, dtype=np.uint8)
    equal = np.stack([v, v, v], -1)[None]
    np.testing.assert_array_equal(metrics.gray_dtpf(equal)[0], np.maximum(v.astype(int) - 1, 0))
    np.testing.assert_array_equal(metrics.gray_clean(equal)[0], v)
    k = np.arange(256)
    # ToTensor then *255 and truncation gives every source level back (lossless)
    f32 = (k.astype(np.float32) / np.float32(255))[None]
    np.testing.assert_array_equal(metrics.to_levels(f32, "dtpf_table")[0], k)
    near = ((k[:-1] + 0.7) / 255)[None]
    np.testing.assert_array_equal(metrics.to_levels(near, "dtpf_table")[0], k[:-1])
    np.testing.assert_array_equal(metrics.to_levels(near, "clean")[0], k[:-1] + 1)
    np.testing.assert_array_equal(metrics.to_levels(np.array([[-0.2, 1.3]]), "clean"), [[0, 255]])
    levels = np.arange(256, dtype=np.uint8)
    assert metrics.to_levels(levels, "dtpf_table") is levels  # uint8 counts as levels already


def test_dtpf_table_en_sf_use_rgb():
    a, b, f = sources(48, 50)
    rgb = np.stack([f, a, b], -1)
    vis = np.repeat(a[..., None], 3, -1)
    s = metrics.evaluate_pair(rgb, vis, b, "dtpf_table")
    pooled = np.concatenate([f.ravel(), a.ravel(), b.ravel()])
    assert s["EN"] == pytest.approx(plain_entropy(pooled), abs=1e-12)
    assert s["SF"] == pytest.approx(plain_sf_testpy(rgb), rel=1e-12)
    gray = metrics.evaluate_pair(f, vis, b, "dtpf_table", names=["SF", "EN"])
    vertical = np.diff(f.astype(float), axis=0)
    assert gray["SF"] == pytest.approx(np.sqrt(np.mean(vertical**2)))
    assert gray["EN"] == pytest.approx(metrics.entropy(f))


def test_evaluate_float_quality_and_means():
    a, b, f = sources(48, 50)
    vis = np.repeat(a[..., None], 3, -1)
    f_float = (f.astype(np.float32) + np.float32(0.6)) / np.float32(255)
    for convention in metrics.CONVENTIONS:
        got = metrics.evaluate_float(f_float[..., None], vis / np.float32(255), b / 255, convention)
        ref = metrics.evaluate_pair(metrics.to_levels(f_float, convention), vis, b, convention)
        np.testing.assert_equal(dict(got), dict(ref))
        assert got.convention == convention
    sub = metrics.evaluate_pair(f, vis, b, "dtpf_table", names=metrics.QUALITY_METRICS)
    assert set(sub) == set(metrics.QUALITY_METRICS)
    m = {"SSIM": 1.0, "VIF": 0.5, "SD": 45, "Qabf": 0.7, "EN": 6.75}
    assert metrics.quality(m) == pytest.approx((1.0 + 0.5 + 1 + 1 + 1) / 5)
    clean = metrics.Scores({"EN": 1.0, "MS_SSIM": math.nan}, "clean")
    mean = metrics.mean_scores([clean, metrics.Scores({"EN": 3.0, "MS_SSIM": 0.5}, "clean")])
    assert mean == {"EN": 2.0, "MS_SSIM": 0.5} and mean.convention == "clean"
    with pytest.raises(ValueError, match="different conventions"):
        metrics.mean_scores([clean, metrics.Scores({"EN": 1.0, "MS_SSIM": 1.0}, "dtpf_table")])


def test_bad_inputs():
    a, b, f = sources(48, 50)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.evaluate_pair(f[:, :-1], a, b)
    with pytest.raises(ValueError, match="at least 41"):
        metrics.evaluate_pair(f[:40], a[:40], b[:40])
    with pytest.raises(ValueError, match="unknown convention"):
        metrics.evaluate_pair(f, a, b, "cddfuse")
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.evaluate_pair(f, a, b, names=["VIFF"])
    with pytest.raises(ValueError, match="integer gray levels"):
        metrics.entropy(f / 255)


def test_infrared_transfer_of_the_visible_image_max_and_a_known_blend():
    rng = np.random.default_rng(0)
    vis = rng.integers(0, 256, (48, 52, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, (48, 52), dtype=np.uint8)
    y = vis.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # BT.601 luma
    assert metrics.infrared_transfer(vis, vis, ir) == 0.0
    gray_max = np.round(np.maximum(y, ir)).astype(np.uint8)  # as reproduce_results' `max`
    assert metrics.infrared_transfer(gray_max, vis, ir) == pytest.approx(1.0, abs=1e-12)
    # Gray scene at 100; 5 % of the infrared pixels at 200, the rest at 50. Where the visible
    # image is brighter than the infrared (the bright patch), or outside the top 5 %, changes
    # in the fused image do not count.
    vis = np.full((40, 50, 3), 100, np.uint8)
    ir = np.full((40, 50), 50, np.uint8)
    hot = np.zeros((40, 50), bool)
    hot[:10, :10] = True  # 100 of 2000 pixels: the top 5 %
    ir[hot] = 200
    vis[:2, :10] = 250  # 20 hot pixels where the visible image is brighter
    fused = vis.copy()
    fused[hot & (vis[..., 0] == 100)] = 125  # a quarter of the way to the infrared
    fused[20:, :] = 0  # outside the top 5 %
    fused[:2, :10] = 0  # where ir < Y
    assert metrics.infrared_transfer(fused, vis, ir) == pytest.approx(0.25, abs=1e-12)
    assert metrics.infrared_transfer(fused[..., 0], vis, ir) == pytest.approx(0.25, abs=1e-12)


def test_infrared_transfer_without_qualifying_pixels_is_nan_and_left_out_of_means():
    a, b, f = sources(48, 50)
    vis = np.full((48, 50, 3), 255, np.uint8)  # no infrared pixel is brighter than this
    s = metrics.evaluate_pair(f, vis, b, "clean", names=("SD", "IRT"))
    assert list(s) == ["SD", "IRT"] and math.isnan(s["IRT"])
    other = metrics.evaluate_pair(f, np.repeat(a[..., None], 3, -1), b, "clean", ["SD", "IRT"])
    assert 0 < other["IRT"] < 1.5
    assert metrics.mean_scores([s, other])["IRT"] == other["IRT"]
    # the same under both conventions: it reads the 8-bit images, not the convention's gray
    rgb = np.repeat(a[..., None], 3, -1)
    assert metrics.evaluate_pair(f, rgb, b, "dtpf_table", ["IRT"])["IRT"] == other["IRT"]
    assert "IRT" not in metrics.evaluate_pair(f, rgb, b)  # a diagnostic: asked for by name
