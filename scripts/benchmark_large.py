"""Big frames through the fuse CLI: wall time, CPU time and peak RSS, compile included.

    python scripts/benchmark_large.py                                  # 1280x1024 and 4000x3000
    python scripts/benchmark_large.py --check --sizes 1024x1280 \
        --pair ../shared/data/m3fd/vi/M3FD_00471.png,../shared/data/m3fd/ir/M3FD_00471.png

For each size (HxW), one pair (the demo scene, or --pair resized with Lanczos) goes through
`python -m dtpf_jax.fuse` in a fresh process, twice: first with an empty compile cache
(cold: the tile shape compiles), then with the cache it left (warm). Wall seconds, CPU
seconds (user + system: what the run costs when the 2 cores are not shared) and the peak RSS
come from the process itself (wait4), the tiles from `tiling.plan_large`. --check also fuses
the pair in one full-frame pass in this process and says how far the CLI's PNG lies from it
(8-bit levels, 64 px or more from the image border), for sizes up to --check-pixels (a full
pass takes about 1.4 GiB a megapixel). The load average is printed: on a shared machine the wall
time moves with it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from dtpf_jax import demo, infer, tiling
from dtpf_jax.images import write_png_atomic

BORDER = 64


def make_pair(h: int, w: int, pair: str | None) -> tuple[np.ndarray, np.ndarray]:
    if not pair:
        vis, ir = demo.make_pair(h, w)
        return vis, ir
    vis_path, ir_path = pair.split(",")
    return tuple(
        np.asarray(Image.open(p).convert(m).resize((w, h), Image.LANCZOS))
        for p, m in ((vis_path, "RGB"), (ir_path, "L"))
    )


def fuse_cli(vis_path: pathlib.Path, ir_path: pathlib.Path, out: pathlib.Path, cache) -> dict:
    """One fresh `python -m dtpf_jax.fuse` process: seconds, CPU seconds, peak RSS, its summary."""
    cmd = [sys.executable, "-m", "dtpf_jax.fuse", "--quiet", "--vis", str(vis_path)]
    cmd += ["--ir", str(ir_path), "--out", str(out)]
    env = dict(os.environ, DTPF_JAX_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    if status:
        raise RuntimeError(f"fuse failed ({status}): {text[-800:]}")
    return {
        "s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_mib": round(usage.ru_maxrss / 1024),
        "fuse": " | ".join(text.strip().splitlines()[-2:]),
    }


def deviation(fused: np.ndarray, full: np.ndarray) -> dict:
    """8-bit distance of the CLI's output from a full-frame pass, away from the border."""
    d = np.abs(fused.astype(np.int16) - full.astype(np.int16))[BORDER:-BORDER, BORDER:-BORDER]
    d = d.max(-1)
    return {
        "mean": round(float(d.mean()), 3),
        "p99.9": float(np.percentile(d, 99.9)),
        "max": int(d.max()),
        "share_over_1": round(float((d > 1).mean()), 5),
    }


def bench(h: int, w: int, args) -> dict:
    vis, ir = make_pair(h, w, args.pair)
    rows, cols = tiling.plan_large(h, w)
    rec = {
        "height": h,
        "width": w,
        "mode": infer.pick_mode("auto", h, w),
        "tiles": f"{len(rows.starts)}x{len(cols.starts)} of {rows.length}x{cols.length}",
        "tiled_pixels": round(rows.work * cols.work / (h * w), 3),
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_png_atomic(root / "vis.png", vis)
        write_png_atomic(root / "ir.png", ir)
        for run in ("cold", "warm"):  # the cold run fills the cache the warm one reads
            rec[run] = fuse_cli(root / "vis.png", root / "ir.png", root / "out", root / "cache")
        if args.check and h * w <= args.check_pixels:
            fused = np.asarray(Image.open(root / "out" / "vis.png"))
            full = infer.fuse_images(vis, ir, mode="full", buckets="fine")
            rec["vs_full"] = deviation(fused, full)
    rec["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024x1280,3000x4000", help="HxW list")
    p.add_argument("--pair", metavar="VIS,IR", help="resize this pair (default: the demo scene)")
    p.add_argument("--check", action="store_true", help="compare with a full-frame pass")
    p.add_argument("--check-pixels", type=int, default=4_000_000, metavar="N")
    p.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    args = p.parse_args(argv)
    records = []
    for size in args.sizes.split(","):
        h, w = (int(x) for x in size.lower().split("x"))
        records.append(bench(h, w, args))
        print(json.dumps(records[-1]), flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
