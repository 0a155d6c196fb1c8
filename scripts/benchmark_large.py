"""Big frames through the fuse CLI, for `scripts/benchmark.py --large`: wall time, CPU time
and peak RSS, compile included.

    python scripts/benchmark.py --large --cli-images 0 --models none  # 1280x1024, 4000x3000
    python scripts/benchmark.py --large 1024x1280 --large-check --cli-images 0 --models none \
        --large-pair ../shared/data/m3fd/vi/M3FD_00471.png,../shared/data/m3fd/ir/M3FD_00471.png

For each size (HxW), one pair (the demo scene, or --large-pair resized with Lanczos) goes
through `python -m dtpf_jax.fuse` in a fresh process, twice: first with an empty compile cache
(cold: the tile shape compiles), then with the cache it left (warm). Wall seconds, CPU seconds
(user + system: what the run costs when the 2 cores are not shared) and the peak RSS come from
the process itself (wait4), the tiles from `tiling.plan_large`. --large-check also fuses the
pair in one full-frame pass in this process and says how far the CLI's PNG lies from it
(8-bit levels, 64 px or more from the image border), for sizes up to 4 Mpixel unless
--large-check-pixels says more (a full pass at 4000x3000 peaks at 14.4 GiB and takes about
4.5 minutes here). --large-passes N runs `fuse --large-passes N`. The load average is
recorded: on a shared machine the wall time moves with it, the CPU time much less.
"""

from __future__ import annotations

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

SIZES = "1024x1280,3000x4000"
BORDER = 64
CHECK_PIXELS = 4_000_000


def make_pair(h: int, w: int, pair: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The demo scene at h x w, or the files 'VIS,IR' resized to it (uint8 RGB and grey)."""
    if not pair:
        return demo.make_pair(h, w)
    vis_path, ir_path = pair.split(",")
    return tuple(
        np.asarray(Image.open(p).convert(m).resize((w, h), Image.LANCZOS))
        for p, m in ((vis_path, "RGB"), (ir_path, "L"))
    )


def fuse_cli(
    vis_path: pathlib.Path, ir_path: pathlib.Path, out: pathlib.Path, cache, passes: int = 1
) -> dict:
    """One fresh `python -m dtpf_jax.fuse` process: seconds, CPU seconds, peak RSS, its summary."""
    cmd = [sys.executable, "-m", "dtpf_jax.fuse", "--quiet", "--vis", str(vis_path)]
    cmd += ["--ir", str(ir_path), "--out", str(out), "--large-passes", str(passes)]
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


def bench(h: int, w: int, pair: str | None = None, check: bool = False, passes: int = 1) -> dict:
    """The record of one size: plan, cold and warm fuse runs, and with `check` vs_full."""
    vis, ir = make_pair(h, w, pair)
    rows, cols = tiling.plan_large(h, w)
    rec = {
        "model": "student (fuse CLI, large frame)",
        "height": h,
        "width": w,
        "pair": pair or "demo",
        "mode": infer.pick_mode("auto", h, w),
        "tiles": f"{len(rows.starts)}x{len(cols.starts)} of {rows.length}x{cols.length}",
        "tiled_pixels": round(rows.work * cols.work / (h * w), 3),
        "passes": passes,
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_png_atomic(root / "vis.png", vis)
        write_png_atomic(root / "ir.png", ir)
        for run in ("cold", "warm"):  # the cold run fills the cache the warm one reads
            rec[run] = fuse_cli(
                root / "vis.png", root / "ir.png", root / "out", root / "cache", passes
            )
        if check:
            fused = np.asarray(Image.open(root / "out" / "vis.png"))
            full = infer.fuse_images(vis, ir, mode="full", buckets="fine")
            rec["vs_full"] = deviation(fused, full)
    rec["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return rec


def table(records: list[dict]) -> str:
    """One line per big frame: the fuse CLI's cold and warm runs, and the distance to full."""
    head = f"{'input':<11}{'tiles':>22}{'cold s':>8}{'CPU s':>7}{'warm s':>8}{'CPU s':>7}"
    head += f"{'peak MiB':>10}{'vs full max / p99.9':>21}{'load':>6}"
    lines = ["fuse CLI on big frames (fresh processes; cold: empty compile cache)", head]
    for r in records:
        c, wm, d = r["cold"], r["warm"], r.get("vs_full")
        near = f"{d['max']} / {d['p99.9']:g}" if d else "-"
        peak = max(c["peak_mib"], wm["peak_mib"])
        tiles = r["tiles"] + (f" x{r['passes']}" if r.get("passes", 1) > 1 else "")
        lines.append(
            f"{r['width']}x{r['height']:<6}{tiles:>22}{c['s']:>8.1f}{c['cpu_s']:>7.1f}"
            f"{wm['s']:>8.1f}{wm['cpu_s']:>7.1f}{peak:>10}{near:>21}{r['load'][0]:>6.1f}"
        )
    return "\n".join(lines)
