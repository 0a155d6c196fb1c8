"""DTPF's SSIM, run as DTPF's own code runs it (torch, float32), on ../shared/metric_cases.

    pip install torch  # not a project dependency; CPU is enough
    python scripts/ssim_reference.py [--cases DIR] [--float64]

Follows the definition in DTPF's `Metric_Python` (../shared/METRICS.md §3.11, §4), written
here from that description: `SSIM_function(A, B, F)` = ssim(A, F) + ssim(B, F), where each
input first goes through `preprocess_to_gray` (int32: 2-D arrays as they are, RGB arrays as
floor(0.2989 R + 0.5870 G + 0.1140 B)), then torchvision's `to_tensor`, which leaves an int32
array undivided, then `* 255.0` (float32, 0..65025); data_range 255, K = (0.01, 0.03), an
11-tap Gaussian (sigma 1.5) built in float32, separable 'valid' conv2d (rows, then columns),
mean of the map.

Prints, per case and fused image, SSIM(A,F) + SSIM(B,F) (and DTPF's MS_SSIM_function, the
same sum of `ms_ssim`) for the two calling conventions of
dtpf_jax.metrics: `clean` (A = vis_gray.png, B = ir.png, F = the fused gray PNG: 2-D arrays)
and `dtpf_table` (vis_rgb.png, ir.png repeated to RGB, the fused PNG as RGB: floor gray), with
ours beside it. These are the reference values recorded in tests/test_metrics.py.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from dtpf_jax import metrics
from dtpf_jax.images import read_image

CASES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "metric_cases"
FUSED = ("fused_max_gray.png", "fused_mean_gray.png")


def _window(dtype: torch.dtype) -> torch.Tensor:
    # DTPF builds the window in float32 whatever the data's dtype, then casts it to the data's.
    c = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(c**2) / (2 * 1.5**2))
    return (g / g.sum()).to(dtype)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(x, g.view(1, 1, -1, 1))  # along H
    return F.conv2d(x, g.view(1, 1, 1, -1))  # along W


def _ssim_cs(xt: torch.Tensor, yt: torch.Tensor) -> tuple[float, float]:
    g = _window(xt.dtype)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _blur(xt, g), _blur(yt, g)
    s1 = _blur(xt * xt, g) - mu1.pow(2)
    s2 = _blur(yt * yt, g) - mu2.pow(2)
    s12 = _blur(xt * yt, g) - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1.pow(2) + mu2.pow(2) + c1) * cs
    return ssim_map.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def _tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # to_tensor(int32 array) keeps int32; int32 tensor * 255.0 -> the default float dtype.
    return torch.from_numpy(np.ascontiguousarray(x, np.int32))[None, None].to(dtype) * 255.0


def dtpf_ssim(x: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float32) -> float:
    """DTPF's ssim() of two int32 gray arrays (what preprocess_to_gray returns)."""
    return float(_ssim_cs(_tensor(x, dtype), _tensor(y, dtype))[0].mean())


def dtpf_ms_ssim(x: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float32) -> float:
    """DTPF's ms_ssim(): 5 scales, ReLU on each cs and the last SSIM, avg_pool2d between."""
    xt, yt = _tensor(x, dtype), _tensor(y, dtype)
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], dtype=dtype)
    levels = []
    for i in range(5):
        s, cs = _ssim_cs(xt, yt)
        if i < 4:
            levels.append(F.relu(cs))
            pad = [n % 2 for n in xt.shape[2:]]
            xt, yt = F.avg_pool2d(xt, 2, padding=pad), F.avg_pool2d(yt, 2, padding=pad)
    levels.append(F.relu(s))
    return float(torch.prod(torch.stack(levels) ** weights.reshape(-1, 1, 1), dim=0).mean())


def dtpf_gray(img: np.ndarray) -> np.ndarray:
    """preprocess_to_gray: 2-D arrays cast to int32, (H, W, 3) to the floor of np.dot."""
    img = np.asarray(img, np.float64)
    if img.ndim == 3:
        img = np.dot(img, [0.2989, 0.5870, 0.1140])
    return img.astype(np.int32)


def inputs(case: pathlib.Path, fused: str, convention: str):
    if convention == "clean":
        return tuple(read_image(case / n, "L") for n in ("vis_gray.png", "ir.png", fused))
    ir = read_image(case / "ir.png", "L")
    rgb = (read_image(case / "vis_rgb.png", "RGB"), np.repeat(ir[..., None], 3, -1))
    return (*rgb, read_image(case / fused, "RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=pathlib.Path, default=CASES)
    parser.add_argument("--float64", action="store_true", help="the same code in float64")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one summation order, whatever the machine
    dtype = torch.float64 if args.float64 else torch.float32
    print(f"torch {torch.__version__}, {dtype}")
    head = f"{'case':12} {'fused':20} {'convention':11} {'metric':7} {'DTPF':>9} {'ours':>9}"
    print(f"{head} {'ours-DTPF':>10}")
    for case in sorted(p for p in args.cases.iterdir() if p.is_dir()):
        for fused in FUSED:
            for convention in metrics.CONVENTIONS:
                a, b, f = inputs(case, fused, convention)
                ga, gb, gf = (dtpf_gray(x) for x in (a, b, f))
                ours = metrics.evaluate_pair(f, a, b, convention, names=["SSIM", "MS_SSIM"])
                for name, fn in (("SSIM", dtpf_ssim), ("MS_SSIM", dtpf_ms_ssim)):
                    ref = fn(ga, gf, dtype) + fn(gb, gf, dtype)
                    row = f"{case.name:12} {fused:20} {convention:11} {name:7} {ref:9.6f}"
                    print(f"{row} {ours[name]:9.6f} {ours[name] - ref:+10.2e}")


if __name__ == "__main__":
    main()
