"""The built-in demo pair (made by code, not a dataset image) and a vis | ir | fused page."""

from __future__ import annotations

import html
import pathlib
from collections.abc import Sequence

import numpy as np

from dtpf_jax.images import read_image, to_uint8, write_png_atomic

DEMO_SIZE = (192, 256)
HTML_IMAGES = 50


PEOPLE = ((0.7, 0.72, 1.0), (0.85, 0.78, 1.2), (0.25, 0.8, 0.9))  # (x, y, height scale)

# More scenes from the same generator, for the README's figure (scripts/make_gallery.py).
SCENES = {
    "street": {},
    "crossing": {"people": ((0.62, 0.7, 0.8), (0.74, 0.75, 1.1), (0.9, 0.82, 1.3)), "mirror": True},
    "fog": {"people": ((0.15, 0.75, 1.0), (0.66, 0.8, 1.2)), "alley": 0.5, "haze": 0.6},
}


def make_pair(
    h: int = DEMO_SIZE[0],
    w: int = DEMO_SIZE[1],
    people=PEOPLE,
    alley: float = 0.12,
    haze: float = 0.0,
    mirror: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic night street: visible RGB with a dark alley, IR with warm people and a car.

    `alley` scales the alley's visible brightness; `haze` (0-1) blends the visible image
    toward a flat gray (fog); `mirror` flips the scene left-right.
    """
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    sky = yy < 0.45
    vis = np.where(sky[..., None], [0.35, 0.45, 0.7] - 0.25 * yy[..., None], [0.42, 0.4, 0.36])
    bldg = (xx > 0.08) & (xx < 0.4) & (yy > 0.15) & (yy < 0.62)
    vis[bldg] = [0.55, 0.38, 0.3]
    windows = bldg & (np.sin(xx * 90) > 0.3) & (np.sin(yy * 70) > 0.2)
    vis[windows] = [0.95, 0.85, 0.5]
    in_alley = (xx > 0.55) & (yy > 0.3)  # the dark region: people there are invisible in vis
    vis[in_alley] *= alley
    ir = np.where(sky, 0.12, 0.35) + 0.1 * bldg + 0.05 * xx
    for cx, cy, s in people:
        person = ((xx - cx) / 0.025) ** 2 + ((yy - cy) / (0.09 * s)) ** 2 < 1
        head = ((xx - cx) / 0.018) ** 2 + ((yy - cy + 0.12 * s) / 0.03) ** 2 < 1
        ir[person | head] = 0.92
        vis[person | head] = vis[person | head] * 0.8 + 0.04
    car = (xx > 0.42) & (xx < 0.62) & (yy > 0.78) & (yy < 0.9)
    vis[car], ir[car] = [0.2, 0.25, 0.55], 0.6
    ir[car & (xx < 0.47)] = 0.97  # warm engine
    vis = (1 - haze) * vis + haze * 0.62
    vis = vis + rng.normal(0, 0.015, vis.shape)
    ir = ir + rng.normal(0, 0.01, ir.shape)
    if mirror:
        vis, ir = vis[:, ::-1], ir[:, ::-1]
    return to_uint8(vis), to_uint8(ir)


def page_html(jobs: Sequence, title: str, note: str = "") -> str:
    """A self-contained vis | ir | fused page of (at most HTML_IMAGES) jobs."""
    from dtpf_jax.evaluate import thumbnail_uri

    rows = []
    for j in jobs[:HTML_IMAGES]:
        cells = [
            thumbnail_uri(read_image(p, m), 320)
            for p, m in ((j.vis, "RGB"), (j.ir, "L"), (j.out, "RGB"))
        ]
        imgs = "".join(f"<td><img src='{u}'></td>" for u in cells)
        rows.append(f"<tr><td>{html.escape(j.name)}</td>{imgs}</tr>")
    more = f"<p>first {HTML_IMAGES} of {len(jobs)} pairs</p>" if len(jobs) > HTML_IMAGES else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td{padding:4px;vertical-align:top}"
        ".note{color:#a40}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(note)}</p>{more}"
        "<table><tr><th>name</th><th>visible / A</th><th>infrared / B</th><th>fused</th></tr>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )


def write_inputs(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the demo pair as out/vis/street.png and out/ir/street.png."""
    vis, ir = make_pair()
    for sub, img in (("vis", vis), ("ir", ir)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        write_png_atomic(out / sub / "street.png", img)
    return out / "vis", out / "ir"
