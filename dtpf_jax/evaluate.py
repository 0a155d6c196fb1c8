"""Score fused images against their sources: a table of means, a per-image CSV, an HTML report.

    python -m dtpf_jax.evaluate --fused out/dtpf --vis data/vi --ir data/ir \
        --convention dtpf_table --csv scores.csv --html report.html

The library entry point is `evaluate_folders`; `format_table`, `write_csv`, `write_html` and
`write_gallery` (one PNG of the first pairs side by side, for a README) render its result.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import io
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dtpf_jax import metrics
from dtpf_jax.images import (
    DataError,
    atomic_write,
    check_output_file,
    image_files,
    pair_by_name,
    pair_files,
    read_image,
    thumbnail,
    thumbnail_uri,
    write_png_atomic,
)

FORMATS = {"Nabf": ".6f", "MSE": ".6f", "SD": ".3f", "SF": ".3f", "AG": ".3f", "PSNR": ".3f"}


@dataclasses.dataclass
class Evaluation:
    """Per-image scores of one or more methods on the same pairs, under one convention."""

    convention: str
    methods: list[str]
    pairs: list[tuple[str, pathlib.Path, pathlib.Path]]  # (name, vis path, ir path)
    fused: dict[str, list[pathlib.Path]]  # method -> one path per pair
    scores: dict[str, list[metrics.Scores]]  # method -> one Scores per pair
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)

    def means(self) -> dict[str, metrics.Scores]:
        """Method -> mean of each metric over the images (NaN entries skipped)."""
        return {m: metrics.mean_scores(self.scores[m]) for m in self.methods}

    @property
    def metric_names(self) -> list[str]:
        """The metrics that were computed, in table order."""
        return list(self.scores[self.methods[0]][0]) if self.pairs else []


def method_names(folders: Sequence[str | os.PathLike]) -> list[str]:
    """One name per fused folder: its folder name, or parent/name where two names collide."""
    paths = [pathlib.Path(f).resolve() for f in folders]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"--fused folders repeat ({', '.join(dup)}); pass each folder once")
    return names


def evaluate_folders(
    fused: Sequence[str | os.PathLike] | str | os.PathLike,
    vis: str | os.PathLike,
    ir: str | os.PathLike,
    convention: str = "clean",
    names: Sequence[str] | None = None,
    progress: bool = False,
    keep_going: bool = False,
) -> Evaluation:
    """Pair every fused folder with the sources by basename and score each image: `names`,
    by default every metric and the diagnostic IRT (metrics.METRICS + metrics.DIAGNOSTICS).

    Raises DataError (one line, naming the files) for missing folders, unmatched names,
    unreadable images or sizes that differ; with `keep_going`, such a pair is left out of every
    method's scores and listed in `skipped` instead (DataError only when none is left).
    """
    if convention not in metrics.CONVENTIONS:
        raise DataError(f"unknown convention {convention!r}; use one of {metrics.CONVENTIONS}")
    fused_dirs = [fused] if isinstance(fused, str | os.PathLike) else list(fused)
    if not fused_dirs:
        raise DataError("no fused folder given; pass at least one --fused DIR")
    methods = method_names(fused_dirs)
    names = metrics.METRICS + metrics.DIAGNOSTICS if names is None else tuple(names)
    roles = ["--vis", "--ir"] + [f"--fused {m}" for m in methods]
    pairs, missing = pair_files([vis, ir, *fused_dirs], roles)
    if missing and not keep_going:
        pair_by_name([vis, ir, *fused_dirs], roles)  # raises, naming the unmatched
    ev = Evaluation(convention, methods, [], {m: [] for m in methods}, {m: [] for m in methods})
    ev.skipped = [(n, "missing in " + ", ".join(where)) for n, where in missing.items()]
    bar = tqdm(
        total=len(pairs) * len(methods),
        desc=f"metrics ({convention})",
        unit="img",
        disable=None if progress else True,
        file=sys.stderr,
    )
    with bar:
        for name, (vis_path, ir_path, *fused_paths) in pairs:
            try:
                vis_img, ir_img = read_image(vis_path, "RGB"), read_image(ir_path, "L")
                _check_size(ir_path, ir_img, vis_path, vis_img)
                scores = []
                for path in fused_paths:
                    fused_img = read_image(path, "RGB")
                    _check_size(path, fused_img, vis_path, vis_img)
                    scores.append(
                        metrics.evaluate_pair(fused_img, vis_img, ir_img, convention, names)
                    )
                    bar.update()
            except DataError as e:
                if not keep_going:
                    raise
                ev.skipped.append((name, str(e)))
                continue
            ev.pairs.append((name, vis_path, ir_path))
            for m, path, score in zip(methods, fused_paths, scores, strict=True):
                ev.fused[m].append(path)
                ev.scores[m].append(score)
    ev.skipped.sort()
    if not ev.pairs:
        name, reason = ev.skipped[0]
        raise DataError(
            f"none of the {len(ev.skipped)} pairs could be scored (first: {name}: {reason})"
        )
    return ev


def _check_size(path, img, ref_path, ref) -> None:
    h, w = img.shape[:2]
    if (h, w) != ref.shape[:2]:
        rh, rw = ref.shape[:2]
        raise DataError(
            f"{path}: {w}x{h} pixels but {ref_path} has {rw}x{rh}; "
            "every image of a pair must have the same size"
        )
    if min(h, w) < metrics.MIN_SIDE:
        raise DataError(
            f"{path}: {w}x{h} pixels is too small; the metrics (VIF's 4 scales) need at least "
            f"{metrics.MIN_SIDE}x{metrics.MIN_SIDE}"
        )


def _header(k: str) -> str:
    return k + ("↓" if k in metrics.LOWER_IS_BETTER else "↑")


def _fmt(k: str, v: float) -> str:
    if math.isnan(v):
        return "—"
    if k in ("Nabf", "MSE") and 0 < abs(v) < 1e-3:
        return f"{v:.3e}"
    return format(v, FORMATS.get(k, ".4f"))


def format_table(ev: Evaluation, markdown: bool = False) -> str:
    """Means per method and metric as aligned text or a Markdown table; ↓ marks lower-is-better."""
    means = ev.means()
    keys = ev.metric_names
    rows = [["method"] + [_header(k) for k in keys]]
    rows += [[m] + [_fmt(k, means[m][k]) for k in keys] for m in ev.methods]
    title = f"convention {ev.convention}, mean over {len(ev.pairs)} images"
    if ev.skipped:
        title += f" ({len(ev.skipped)} pairs left out: --keep-going)"
    missing = [k for k in keys if any(math.isnan(s[k]) for m in ev.methods for s in ev.scores[m])]
    note = f"; left out of the means where undefined: {', '.join(missing)}" if missing else ""
    if "MS_SSIM" in missing:
        note += f" (MS_SSIM needs {metrics.MS_SSIM_MIN_SIDE} px)"
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(
            1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(keys) + 1)) + "|"
        )
        return f"{title}{note} (↑ higher is better, ↓ lower is better)\n\n" + "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return f"{title}{note} (↑ higher is better, ↓ lower is better)\n" + "\n".join(lines)


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def csv_text(ev: Evaluation) -> str:
    """Per-image scores: name, then the metrics (a leading `method` column for several methods)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    several = len(ev.methods) > 1
    keys = ev.metric_names
    writer.writerow((["method"] if several else []) + ["name"] + keys)
    for m in ev.methods:
        for (name, _, _), s in zip(ev.pairs, ev.scores[m], strict=True):
            # repr keeps every digit of the float; an undefined value (NaN) is left empty.
            vals = ["" if math.isnan(s[k]) else repr(float(s[k])) for k in keys]
            writer.writerow(([m] if several else []) + [name] + vals)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, ev: Evaluation) -> None:
    """Write `csv_text(ev)` atomically."""
    _write_atomic(path, csv_text(ev))


_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child
{text-align:left}.g td{text-align:center;vertical-align:top;font-size:80%}.g img{display:block}
.best{font-weight:bold}"""


def html_text(
    ev: Evaluation, max_images: int = 50, keys: Sequence[str] = ("MI", "VIF", "Qabf", "SSIM")
) -> str:
    """A self-contained HTML report: the table of means and vis | ir | fused thumbnails."""
    e = html.escape
    means = ev.means()
    metric_keys = ev.metric_names
    best = {}
    for k in metric_keys:
        vals = [means[m][k] for m in ev.methods if not math.isnan(means[m][k])]
        if len(ev.methods) > 1 and vals:
            best[k] = min(vals) if k in metrics.LOWER_IS_BETTER else max(vals)
    head = "".join(f"<th>{e(_header(k))}</th>" for k in metric_keys)
    rows = []
    for m in ev.methods:
        cells = "".join(
            ("<td class=best>" if best.get(k) == means[m][k] else "<td>")
            + f"{_fmt(k, means[m][k])}</td>"
            for k in metric_keys
        )
        rows.append(f"<tr><td>{e(m)}</td>{cells}</tr>")
    shown = ev.pairs if max_images <= 0 else ev.pairs[:max_images]
    gallery = []
    keys = [k for k in keys if k in metric_keys]
    for i, (name, vis_path, ir_path) in enumerate(shown):
        cells = [
            f"<td>vis<img src='{thumbnail_uri(read_image(vis_path, 'RGB'))}'></td>",
            f"<td>ir<img src='{thumbnail_uri(read_image(ir_path, 'L'))}'></td>",
        ]
        for m in ev.methods:
            s = ev.scores[m][i]
            line = " ".join(f"{k} {_fmt(k, s[k])}" for k in keys)
            uri = thumbnail_uri(read_image(ev.fused[m][i], "RGB"))
            cells.append(f"<td>{e(m)}<img src='{uri}'>{e(line)}</td>")
        gallery.append(f"<tr><td>{e(name)}</td>{''.join(cells)}</tr>")
    more = (
        f"<p>first {len(shown)} of {len(ev.pairs)} images</p>" if len(shown) < len(ev.pairs) else ""
    )
    left_out = "; ".join(f"{n}: {why}" for n, why in ev.skipped)
    left_out = left_out and f"\n<p>{len(ev.skipped)} pairs left out: {e(left_out)}</p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fusion metrics ({e(ev.convention)})</title>
<style>{_CSS}</style></head><body>
<h1>Fusion metrics</h1>
<p>convention <b>{e(ev.convention)}</b>, mean over {len(ev.pairs)} images;
↑ higher is better, ↓ lower is better.</p>{left_out}
<table><tr><th>method</th>{head}</tr>
{chr(10).join(rows)}
</table>
<h2>Images</h2>{more}
<table class="g">
{chr(10).join(gallery)}
</table>
</body></html>
"""


def write_html(path: str | os.PathLike, ev: Evaluation, max_images: int = 50) -> None:
    """Write `html_text(ev, max_images)` atomically."""
    _write_atomic(path, html_text(ev, max_images))


GALLERY_PAD = 6
GALLERY_LINE = 14  # pixels per text line (Pillow's built-in font)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut and ended with '...' where it would run wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def gallery_image(
    ev: Evaluation,
    max_images: int = 4,
    side: int = 256,
    keys: Sequence[str] = ("VIF", "Qabf"),
) -> np.ndarray:
    """The first `max_images` pairs as one RGB image: a row per pair, columns vis | ir | each
    method's fused image (thumbnails fitted into side x side, as the HTML's), a label above
    each column, the pair's name under its visible image and its `keys` scores under each
    fused image. Text wider than its column is cut short with '...'."""
    shown = ev.pairs if max_images <= 0 else ev.pairs[:max_images]
    keys = [k for k in keys if k in ev.metric_names]
    font = ImageFont.load_default()
    rows = []
    for i, (name, vis_path, ir_path) in enumerate(shown):
        cells = [
            (read_image(vis_path, "RGB"), name),
            (read_image(ir_path, "L"), ""),
        ]
        for m in ev.methods:
            s = ev.scores[m][i]
            line = " ".join(f"{k} {_fmt(k, s[k]) if not math.isnan(s[k]) else 'n/a'}" for k in keys)
            cells.append((read_image(ev.fused[m][i], "RGB"), line))
        rows.append([(thumbnail(img, side).convert("RGB"), caption) for img, caption in cells])
    labels = ["visible / A", "infrared / B", *ev.methods]
    cell_w = side + GALLERY_PAD
    row_h = [max(t.height for t, _ in r) + GALLERY_LINE + GALLERY_PAD for r in rows]
    width = GALLERY_PAD + cell_w * len(labels)
    height = GALLERY_PAD + GALLERY_LINE + sum(row_h)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    for c, label in enumerate(labels):
        label = _fit_text(draw, label, font, side)
        draw.text((GALLERY_PAD + c * cell_w, GALLERY_PAD // 2), label, fill="black", font=font)
    y = GALLERY_PAD + GALLERY_LINE
    for r, h in zip(rows, row_h, strict=True):
        for c, (t, caption) in enumerate(r):
            x = GALLERY_PAD + c * cell_w
            page.paste(t, (x, y))
            caption = _fit_text(draw, caption, font, side)
            draw.text((x, y + t.height + 1), caption, fill="black", font=font)
        y += h
    return np.asarray(page)


def write_gallery(path: str | os.PathLike, ev: Evaluation, max_images: int = 4) -> None:
    """Write `gallery_image(ev, max_images)` as a PNG, atomically."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(path, gallery_image(ev, max_images))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dtpf_jax.evaluate",
        description=(
            "Score fused images against their visible and infrared sources (files paired by "
            "basename, ignoring the extension): prints the mean of each metric, optionally "
            "writes a per-image CSV and an HTML report. Beside the metrics, the diagnostic IRT "
            "(infrared transfer): over the brightest 5% of the infrared where it is brighter "
            "than the visible luma, the fraction of that excess the fused luma brings in "
            "(visible image 0, max(vis, ir) 1; empty where no pixel qualifies). Definitions and "
            "the two conventions: the docstring of dtpf_jax/metrics.py."
        ),
    )
    p.add_argument(
        "--fused",
        action="extend",
        nargs="+",
        required=True,
        metavar="DIR",
        help="folder of fused images; repeat (or list several) to compare methods, "
        "one row per method named after its folder",
    )
    p.add_argument("--vis", required=True, metavar="DIR", help="folder of visible images")
    p.add_argument("--ir", required=True, metavar="DIR", help="folder of infrared images")
    p.add_argument(
        "--convention",
        choices=metrics.CONVENTIONS,
        default="clean",
        help="clean: metrics of the gray images (Pillow BT.601 gray); dtpf_table: "
        "as the official test.py feeds them, comparable with the paper's tables "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="per-image CSV: name, EN, SD, SF, AG, MI, SCD, CC, VIF, Qabf, Nabf, SSIM, "
        "MS_SSIM, PSNR, MSE, IRT (full precision; MS_SSIM empty below 161 px, IRT where no "
        "pixel qualifies); with "
        "several --fused folders, one file with a leading 'method' column",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="self-contained HTML report: the table and vis | ir | fused thumbnails",
    )
    p.add_argument(
        "--html-images",
        type=int,
        default=50,
        metavar="N",
        help="thumbnails of the first N images in the HTML (0: all; default 50)",
    )
    p.add_argument(
        "--gallery",
        metavar="FILE",
        help="one PNG of the first pairs side by side (vis | ir | each method, with VIF and "
        "Qabf under each fused image): a figure for a README",
    )
    p.add_argument(
        "--gallery-images",
        type=int,
        default=4,
        metavar="N",
        help="pairs (rows) in the --gallery PNG (0: all; default 4)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="score the pairs that exist and decode; leave the others out (unmatched names, "
        "undecodable files, sizes that differ), one `skipped: NAME: reason` line each, the "
        "count in the table's title; exit status 1 if any",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_outputs(args) -> None:
    """Raise DataError unless --csv, --html and --gallery name new files, apart from each other
    and from every input image; before any scoring."""
    folders = [("--vis", args.vis), ("--ir", args.ir), *(("--fused", f) for f in args.fused)]
    taken = {}
    for flag, folder in folders:
        taken |= {p.resolve(): f"an input image ({flag})" for p in image_files(folder).values()}
    for flag in ("--csv", "--html", "--gallery"):
        path = getattr(args, flag[2:])
        if path:
            taken[check_output_file(path, flag, taken, [f for _, f in folders])] = f"{flag}'s file"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, with one `error:` line; 1 when
    --keep-going left pairs out)."""
    args = _parser().parse_args(argv)
    if args.gallery and pathlib.Path(args.gallery).suffix.lower() != ".png":
        print(f"error: --gallery {args.gallery}: it writes a PNG; name it *.png", file=sys.stderr)
        return 2
    try:
        check_outputs(args)
        ev = evaluate_folders(
            args.fused,
            args.vis,
            args.ir,
            args.convention,
            progress=not args.quiet,
            keep_going=args.keep_going,
        )
    except DataError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    for name, reason in ev.skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    print(format_table(ev))
    outputs = [(args.csv, lambda p: write_csv(p, ev))]
    outputs.append((args.html, lambda p: write_html(p, ev, args.html_images)))
    outputs.append((args.gallery, lambda p: write_gallery(p, ev, args.gallery_images)))
    for target, write in outputs:
        if target:
            try:
                write(target)
            except (DataError, OSError) as err:
                reason = err.strerror if isinstance(err, OSError) and err.strerror else err
                print(
                    f"error: cannot write {target}: {reason}; pass a writable file path",
                    file=sys.stderr,
                )
                return 2
    if ev.skipped:
        print(f"skipped: {len(ev.skipped)} pairs left out (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
