"""Time all 14 fusion metrics on one 480x640 pair (the MSRS frame size), median of 5.

    python scripts/time_metrics.py [--repeats 5] [--plain-repeats 1] [--no-plain]

Prints the median wall time of `metrics.evaluate_pair` in both conventions, a per-metric
breakdown, and for comparison the plain per-pixel implementation of the same formulas from
tests/test_metrics.py (slow: about a minute per run, so it runs once by default).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

from dtpf_jax import metrics

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"


def make_pair(h: int = 480, w: int = 640, seed: int = 0):
    """A synthetic vis (RGB), ir and max-fused triple with edges, texture and flat areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 110 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    vis = np.clip(base[..., None] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    ir = np.clip(255 - base + 40 * (xx > w // 2) + rng.normal(0, 8, (h, w)), 0, 255)
    ir = ir.astype(np.uint8)
    return np.maximum(vis, ir[..., None]), vis, ir


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--plain-repeats", type=int, default=1)
    p.add_argument("--no-plain", action="store_true")
    args = p.parse_args(argv)
    fused, vis, ir = make_pair()
    metrics.evaluate_pair(fused, vis, ir)  # warm-up
    print(f"480x640, median of {args.repeats}:")
    for convention in metrics.CONVENTIONS:
        t = median_time(lambda c=convention: metrics.evaluate_pair(fused, vis, ir, c), args.repeats)
        print(f"  all 14 metrics, {convention:10s} {t * 1000:7.1f} ms")
    for k in metrics.METRICS:
        t = median_time(lambda k=k: metrics.evaluate_pair(fused, vis, ir, names=[k]), args.repeats)
        print(f"    {k:8s} {t * 1000:7.1f} ms (with the gray conversion)")
    if args.no_plain:
        return
    sys.path.insert(0, str(TESTS))
    from test_metrics import plain_clean

    a, b, f = (metrics.gray_clean(x).astype(float) for x in (vis, ir, fused))
    slow = {}
    t = median_time(lambda: slow.update(plain_clean(a, b, f)), args.plain_repeats)
    print(f"  plain per-pixel loops, clean   {t:7.1f} s (median of {args.plain_repeats})")
    fast = metrics.evaluate_pair(fused, vis, ir, "clean")
    worst = max(metrics.METRICS, key=lambda k: abs(fast[k] - slow[k]) / abs(slow[k]))
    dev = abs(fast[worst] - slow[worst]) / abs(slow[worst])
    print(f"  largest relative difference plain vs vectorised: {dev:.1e} ({worst})")


if __name__ == "__main__":
    main()
