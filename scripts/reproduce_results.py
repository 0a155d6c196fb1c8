"""Fuse the test splits with every method and score them: the tables of RESULTS.md.

  python scripts/reproduce_results.py --data ../shared/data --out results \
      --student dtpf_jax/weights/student_ivf.msgpack \
      --student-med 'student_{task}' --teacher teacher_ivf.msgpack --captions captions

Methods (rows): `student` (a weight file, text-free; `student_tiles`: the same network under
the official sliding-window test protocol, on --tiles-splits), `teacher` (a text-guided weight
file fed each pair's caption embedding from the `--captions` cache), `teacher_notext` (the same
teacher with an all-zero text embedding: the paper's text ablation), and three baselines:
`vis`, the visible / A image as it is (RGB; the networks output it plus a learned residual, so
this is what a network that learned nothing would score), `max` = max(vis_gray, ir) and
`mean` = (vis_gray + ir) / 2 (BT.601 gray of the visible / A image).
On the medical splits the `student` rows
come from --student-med when it is given: a weight file or shipped name, where `{task}` stands
for the split's Harvard task (`student_{task}`: the shipped student of each task).
A method whose weights are not given is left out. Splits: folders under --data holding a
vi/ir or ct|pet|spect + mri layout; `REL:N` takes the first N pairs by name (linked into
<out>/subsets/), for the teacher rows that a CPU cannot afford on a whole split. The teacher
rows appear only on --teacher-splits and where the teacher's kind matches.

Fused images land in <out>/fused/<split>/<method>/<name>.png (existing files are reused, so an
interrupted run resumes; each folder's made_by.json says what made them, the weight file's
sha256 among it, and a folder made by anything else is fused again: a new student never scores
under the old one's images); per-image CSVs in <out>/csv/; the markdown tables, in the paper's
columns, under both metric conventions (`dtpf_table`: as DTPF's test.py, comparable with the
paper; `clean`: the textbook definitions on gray images) in <out>/tables.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import numpy as np

from dtpf_jax import checkpoint, color, config_lib, datasets, evaluate, images, infer, text

IVF_SPLITS = ("msrs/test", "roadscene", "tno", "m3fd")
MED_SPLITS = ("harvard/pet_mri/test", "harvard/spect_mri/test", "harvard/ct_mri/test")
IVF_COLUMNS = ("EN", "MI", "SF", "VIF", "Qabf", "IRT")  # IRT: infrared transfer (metrics.py)
MED_COLUMNS = ("EN", "MI", "SF", "VIF", "Qabf", "SSIM")
CONVENTIONS = ("dtpf_table", "clean")

log = logging.getLogger("reproduce_results")


BASELINES = ("vis", "max", "mean")


def baseline(vis: np.ndarray, ir: np.ndarray, how: str) -> np.ndarray:
    """A baseline's uint8 image: `vis` the visible image unchanged, `max` / `mean` the gray max
    or mean of the visible gray (BT.601) and the infrared image."""
    if how == "vis":
        return vis
    g = np.asarray(color.rgb_to_gray(vis.astype(np.float32) / 255.0)) * 255.0
    g = g[..., 0] if g.ndim == 3 else g
    i = ir.astype(np.float32)
    out = np.maximum(g, i) if how == "max" else (g + i) / 2.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def teacher_embeddings(
    args, kind: str, root: pathlib.Path, pairs: list[datasets.Pair]
) -> np.ndarray:
    cfg = datasets.default_config(kind)
    cfg.root, cfg.captions, cfg.text_mode = str(root), str(args.captions), args.text_mode
    return text.pair_priors(cfg, pairs)[0]


def resolve_split(args, spec: str) -> tuple[datasets.Split, list[datasets.Pair], str] | None:
    """(split, its pairs, a folder-safe name) of `REL` or `REL:N` (first N pairs by name)."""
    rel, _, n = spec.partition(":")
    split = datasets.split_of(args.data / rel)
    if split is None:
        return None
    pairs = datasets.split_pairs(split, args.data)
    if not n:
        return split, pairs, rel
    pairs = pairs[: int(n)]
    sub = args.out / "subsets" / f"{rel.replace('/', '_')}_first{n}"
    for src, role in ((split.a_dir, "a"), (split.b_dir, "b")):
        folder = sub / src.name
        folder.mkdir(parents=True, exist_ok=True)
        for p in pairs:
            path = pathlib.Path(p.a if role == "a" else p.b)
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return (
        datasets.Split(sub, sub / split.a_dir.name, sub / split.b_dir.name, split.kind),
        pairs,
        (f"{rel}:{n}"),
    )


def made_by(args, method: str, model: infer.Model | None) -> dict:
    """What makes a method's images: the baseline's name, or the network's weights and mode."""
    if model is None:
        return {"method": method}
    source = pathlib.Path(model.source)
    sha = checkpoint.file_sha256(source) if source.is_file() else model.source
    stamp = {"method": method, "weights_sha256": sha, "dtype": model.config.dtype}
    stamp["mode"] = "tiles" if method == "student_tiles" else args.mode
    if method == "teacher":
        stamp.update(captions=str(args.captions), text_mode=args.text_mode)
    return stamp


def _clear_if_stale(folder: pathlib.Path, stamp: dict) -> None:
    """Drop the folder's images unless its made_by.json is `stamp`; then write the stamp."""
    path = folder / "made_by.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old == stamp:
        return
    stale = sorted(folder.glob("*.png"))
    if stale:
        log.warning("%s: %d images made by %s, not %s; fused again", folder, len(stale), old, stamp)
        for f in stale:
            f.unlink()
    images.atomic_write(path, json.dumps(stamp, indent=1) + "\n")


def fuse_split(args, split: datasets.Split, pairs, rel: str, models: dict, out: pathlib.Path):
    methods = []
    for method, model in models.items():
        if method in ("teacher", "teacher_notext") and (
            split.kind != args.teacher_kind or rel not in args.teacher_splits
        ):
            continue
        if method == "student_tiles" and rel not in args.tiles_splits:
            continue
        folder = out / "fused" / rel.replace(":", "_first") / method
        folder.mkdir(parents=True, exist_ok=True)
        _clear_if_stale(folder, made_by(args, method, model))
        todo = [p for p in pairs if not (folder / f"{p.name}.png").is_file()]
        emb = None
        if todo and method == "teacher":
            emb = teacher_embeddings(args, split.kind, args.data, todo)
        t0 = time.perf_counter()
        for k, p in enumerate(todo):
            vis, ir = images.read_image(p.a, "RGB"), images.read_image(p.b, "L")
            if method in BASELINES:
                fused = baseline(vis, ir, method)
            else:
                t = None
                if method == "teacher":
                    t = emb[k]
                elif method == "teacher_notext":
                    t = np.zeros((model.config.text_dim,), np.float32)
                mode = "tiles" if method == "student_tiles" else args.mode
                fused = infer.fuse_images(vis, ir, model, text=t, mode=mode)
            images.write_png_atomic(folder / f"{p.name}.png", fused)
        if todo:
            log.info(
                "%s %s: fused %d pairs in %.1f s", rel, method, len(todo), time.perf_counter() - t0
            )
        methods.append(method)
    return methods


def table(ev: evaluate.Evaluation, columns: tuple[str, ...]) -> str:
    means = ev.means()
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in ev.methods:
        lines.append(f"| {m} | " + " | ".join(f"{means[m][c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=datasets.default_config().root)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    p.add_argument("--student", default="", help="student weight file ('' = leave out)")
    p.add_argument(
        "--student-med",
        default="",
        help="medical splits' student: a weight file or shipped name; {task} = the split's "
        "Harvard task, e.g. 'student_{task}' (default: --student on every split)",
    )
    p.add_argument("--teacher", default="", help="teacher weight file ('' = leave out)")
    p.add_argument("--teacher-kind", default="ivf", choices=("ivf", "medical"))
    p.add_argument("--captions", default="", help="caption tree with its CLIP cache (teacher)")
    p.add_argument("--text-mode", default="template", choices=("template", "full"))
    p.add_argument("--splits", nargs="*", default=list(IVF_SPLITS + MED_SPLITS))
    p.add_argument(
        "--teacher-splits",
        nargs="*",
        default=["msrs/test:6", "tno"],
        help="splits (as given in --splits) that also get the teacher rows",
    )
    p.add_argument("--mode", default="auto", choices=("auto", "full", "tiles"))
    p.add_argument(
        "--tiles-splits",
        nargs="*",
        default=["msrs/test"],
        help="splits that also get a `student_tiles` row: the official test protocol (128² "
        "tiles, stride 64, Gaussian blending), about 4x the compute of one full pass",
    )
    args = p.parse_args(argv)
    images.show_info_logs()
    if args.teacher and not args.captions:
        p.error("--teacher needs --captions (the caption tree and its CLIP embedding cache)")

    base_models: dict = {}
    if args.student:
        base_models["student"] = base_models["student_tiles"] = infer.load_model(args.student)
    if args.teacher:
        base_models["teacher"] = base_models["teacher_notext"] = infer.load_model(args.teacher)
    med_students: dict[str, infer.Model] = {}

    def med_student(rel: str) -> infer.Model:
        task = next((t for t in config_lib.MED_TASKS if t in rel), "")
        if "{task}" in args.student_med and not task:
            raise SystemExit(f"{rel}: no Harvard task in its path to fill --student-med's {{task}}")
        name = args.student_med.replace("{task}", task)
        if name not in med_students:
            med_students[name] = infer.load_model(name)
        return med_students[name]

    sections = {c: [] for c in CONVENTIONS}
    for spec in args.splits:
        found = resolve_split(args, spec)
        if found is None:
            print(f"{args.data / spec}: no vi/ir or A/mri layout; skipped", file=sys.stderr)
            continue
        split, pairs, rel = found
        models = dict(base_models)
        if split.kind == "medical" and args.student_med:
            models["student"] = models["student_tiles"] = med_student(rel)
        models.update(dict.fromkeys(BASELINES))
        methods = fuse_split(args, split, pairs, rel, models, args.out)
        columns = MED_COLUMNS if split.kind == "medical" else IVF_COLUMNS
        folders = [args.out / "fused" / rel.replace(":", "_first") / m for m in methods]
        for conv in CONVENTIONS:
            ev = evaluate.evaluate_folders(folders, split.a_dir, split.b_dir, conv)
            csv = args.out / "csv" / f"{rel.replace('/', '_').replace(':', '_first')}_{conv}.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            evaluate.write_csv(csv, ev)
            n = len(ev.pairs)
            sections[conv].append(f"### {rel} ({n} pairs)\n\n{table(ev, columns)}\n")
            if conv == "dtpf_table":
                print(f"\n{rel} ({conv}, {n} pairs)\n{table(ev, columns)}", flush=True)
    md = []
    for conv in CONVENTIONS:
        md.append(f"## Convention `{conv}`\n")
        md.extend(sections[conv])
    (args.out / "tables.md").write_text("\n".join(md))
    print(f"\nwrote {args.out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
