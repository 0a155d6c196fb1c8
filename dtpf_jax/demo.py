"""The built-in demo pair (made by code, not a dataset image) and a vis | ir | fused page."""

from __future__ import annotations

import html
import pathlib
from collections.abc import Sequence

import numpy as np

from dtpf_jax.images import read_image, thumbnail_uri, to_uint8, write_png_atomic

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


COMPARE_KEYS = ("VIF", "Qabf", "IRT")
MAX_RULE = "max(vis, ir)"
SCORES_NOTE = (
    f"{MAX_RULE}: each pixel's channel-wise maximum of the visible image and the infrared, the "
    "simplest fusion rule, for comparison. Under each image, from dtpf_jax.metrics (convention "
    "clean): VIF and Qabf, how much of the sources' information and edges it keeps (higher is "
    "better); IRT (infrared transfer), the share of the infrared's excess brightness over the "
    "visible image that it brings in (0: none, as the visible image; 1: all, as max(vis, ir))."
)


def describe(label: str) -> str:
    """What the demo did, in one sentence, for the terminal and the page."""
    h, w = DEMO_SIZE
    return (
        f"the built-in synthetic pair (a {w}x{h} night street drawn by dtpf_jax/demo.py: a "
        "visible image with a dark alley, an infrared one with warm people and a car) fused "
        f"by {label}"
    )


def compare(job) -> dict:
    """{'max(vis, ir)': Scores, 'fused': Scores} of COMPARE_KEYS for one job's images."""
    from dtpf_jax import metrics

    vis, ir = read_image(job.vis, "RGB"), read_image(job.ir, "L")
    images = {MAX_RULE: np.maximum(vis, ir[..., None]), "fused": read_image(job.out, "RGB")}
    return {k: metrics.evaluate_pair(f, vis, ir, "clean", COMPARE_KEYS) for k, f in images.items()}


def score_line(scores) -> str:
    """'VIF 0.612  Qabf 0.533  IRT 0.810'."""
    return "  ".join(f"{k} {scores[k]:.3f}" for k in COMPARE_KEYS)


def score_table(compared: dict) -> str:
    """The `compare` scores as aligned lines, one per image."""
    width = max(map(len, compared))
    return "\n".join(f"  {k.ljust(width)}  {score_line(s)}" for k, s in compared.items())


def page_html(
    jobs: Sequence, title: str, notes: Sequence[str] = (), compared: Sequence | None = None
) -> str:
    """A self-contained vis | ir | fused page of (at most HTML_IMAGES) jobs, a paragraph per
    note; with `compared` (one `compare` result per job), max(vis, ir) beside the fused image
    and the scores under both."""
    e = html.escape
    rows = []
    for k, j in enumerate(jobs[:HTML_IMAGES]):
        vis, ir = read_image(j.vis, "RGB"), read_image(j.ir, "L")
        cells = [(vis, ""), (ir, "")]
        if compared:
            cells.append((np.maximum(vis, ir[..., None]), score_line(compared[k][MAX_RULE])))
        cells.append(
            (read_image(j.out, "RGB"), score_line(compared[k]["fused"]) if compared else "")
        )
        tds = "".join(
            f"<td><img src='{thumbnail_uri(img, 320)}'>"
            + (f"<br>{e(text)}" if text else "")
            + "</td>"
            for img, text in cells
        )
        rows.append(f"<tr><td>{e(j.name)}</td>{tds}</tr>")
    if len(jobs) > HTML_IMAGES:
        notes = [*notes, f"first {HTML_IMAGES} of {len(jobs)} pairs"]
    heads = ["name", "visible / A", "infrared / B", *([MAX_RULE] if compared else []), "fused"]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td{padding:4px;vertical-align:top}"
        "</style></head><body>"
        f"<h1>{e(title)}</h1>"
        + "".join(f"<p>{e(n)}</p>" for n in notes if n)
        + "<table><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in heads)
        + "</tr>"
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
