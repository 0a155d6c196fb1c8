"""The README's figure: the built-in synthetic scenes fused by a student, beside the max baseline.

  python scripts/make_gallery.py --out docs/gallery.png

Scenes: `dtpf_jax.demo.SCENES` (made by code, so the figure carries no dataset's pixels).
Each is fused by --weights (default: the shipped IVF student) and by the `max` baseline of
scripts/reproduce_results.py (max of the visible gray and the infrared), written as image
folders under --work (a temporary folder by default), scored with `dtpf_jax.evaluate` in the
`dtpf_table` convention and drawn by its `write_gallery`: a row per scene, columns visible |
infrared | student | max, VIF and Qabf under each fused image.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from reproduce_results import baseline

from dtpf_jax import demo, evaluate, images, infer


def write_folders(work: pathlib.Path, model: infer.Model, method: str) -> list[pathlib.Path]:
    """vis/, ir/ and one fused folder per method under `work`; returns the fused folders."""
    dirs = {k: work / k for k in ("vis", "ir", method, "max")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name, kwargs in demo.SCENES.items():
        vis, ir = demo.make_pair(**kwargs)
        images.write_png_atomic(dirs["vis"] / f"{name}.png", vis)
        images.write_png_atomic(dirs["ir"] / f"{name}.png", ir)
        images.write_png_atomic(dirs[method] / f"{name}.png", infer.fuse_images(vis, ir, model))
        images.write_png_atomic(dirs["max"] / f"{name}.png", baseline(vis, ir, "max"))
    return [dirs[method], dirs["max"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="PNG to write")
    p.add_argument("--weights", default="student_ivf", help="shipped name or weight file")
    p.add_argument("--work", type=pathlib.Path, help="keep the image folders here")
    args = p.parse_args(argv)
    model = infer.load_model(args.weights)
    if model.text_guided:
        p.error(f"{args.weights}: a text-guided network; the figure shows text-free students")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or pathlib.Path(tmp)
        fused = write_folders(work, model, "student")
        ev = evaluate.evaluate_folders(
            fused, work / "vis", work / "ir", "dtpf_table", progress=False
        )
        evaluate.write_gallery(args.out, ev, max_images=0)
    print(evaluate.format_table(ev))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
