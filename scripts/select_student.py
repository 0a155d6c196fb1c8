"""Pick the IVF student to ship from a run's candidate files, by the rule fixed before the run.

    python scripts/select_student.py --candidates OUT/student_s*.msgpack --data ../shared/data \
        --out selection

The ship rule (issue 25; written 2026-12-04, before any GPU run, and the same for later runs:
a distilled student replaces the shipped one only by it too):

- Selection data, used by no table and by no training run: msrs/train's last 5 % by name
  (2 frames, 00881N and 01023N: what every training config holds back, data.val_split
  (0.95, 1.0)) and RoadScene's pairs after its first 40 by name (181 pairs, FLIR_04354 to
  FLIR_video_04215; the tables use the first 40, `roadscene:40`).
- Score: the official fusion loss (`losses.fusion_loss`: its `default` task weights, no
  intensity_l2) of a method's 8-bit output, as `fuse` writes it (whole image, --color rgb),
  against its pair, whole image; the mean over each set; the score is the mean of the two
  sets' means (each set counts half). Lower is better. Returning the visible image cannot win:
  it scores its own loss, which a network has to go below to be shipped.
- The winner is the candidate with the lowest score. It ships if its score is below both the
  shipped student's (dtpf_jax/weights/student_ivf.msgpack) and the visible image's; else
  nothing ships.
- Reported beside the score, choosing nothing: each set's IRT (infrared transfer), VIF and
  Qabf (`dtpf_table`), and the max(vis, ir) baseline's figures.

Writes <out>/selection.md (the table and the verdict), <out>/scores.csv (per image) and
<out>/decision.json (the verdict; when it ships, the record for dtpf_jax/weights/
student_ivf.json); --ship then also copies the winner to dtpf_jax/weights/student_ivf.msgpack
and writes that record beside it (tests/test_weights.py checks the pair). About an
hour on an idle 2-core CPU for 4 candidates (183 pairs fused by 5 networks, a loss compile per
RoadScene size); --roadscene-every 10 scores the 19 pairs at positions 40, 50, ..., 220 (the
earlier CPU runs' RoadScene validation) in a few minutes: a quick look, not the rule, never
shipped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from dtpf_jax import checkpoint, datasets, images, infer, losses, metrics

SCRIPTS = pathlib.Path(__file__).resolve().parent
REPO = SCRIPTS.parent
SHIPPED = infer.WEIGHTS_DIR / "student_ivf.msgpack"
MSRS_HELD_BACK = (0.95, 1.0)  # datasets.default_config().val_split
ROADSCENE_TABLES = 40  # roadscene:40, the tables' pairs
INFO = ("IRT", "VIF", "Qabf")


def _baseline():
    spec = importlib.util.spec_from_file_location(
        "reproduce_results", SCRIPTS / "reproduce_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.baseline


def selection_sets(root: pathlib.Path, every: int = 1) -> dict[str, list[datasets.Pair]]:
    """The rule's two sets: held-back msrs/train frames, RoadScene after its first 40."""
    splits = {rel: datasets.split_of(root / rel) for rel in ("msrs/train", "roadscene")}
    for rel, split in splits.items():
        if split is None:
            raise images.DataError(f"{root / rel}: no vi/ir layout; pass --data (../shared/data)")
    road = datasets.split_pairs(splits["roadscene"], root)[ROADSCENE_TABLES:]
    return {
        "msrs/train held back": datasets.split_pairs(splits["msrs/train"], root, MSRS_HELD_BACK),
        "roadscene after 40": road[::every],
    }


def _mean(values) -> float:
    """Mean without the NaN entries (IRT of an image with no qualifying pixel)."""
    kept = [v for v in values if not np.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def decide(scores: dict[str, float], candidates: list[str]) -> dict:
    """The winner among the candidates and whether it ships (below shipped and vis)."""
    winner = min(candidates, key=lambda m: scores[m])
    bars = {m: scores[m] for m in ("shipped", "vis") if m in scores}
    return {
        "winner": winner,
        "score": scores[winner],
        "bars": bars,
        "ships": all(scores[winner] < v for v in bars.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", nargs="+", required=True, help="student weight files")
    data_root = pathlib.Path(datasets.default_config().root)
    p.add_argument("--data", type=pathlib.Path, default=data_root)
    p.add_argument("--shipped", default=str(SHIPPED), help="the shipped student to beat")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("selection"))
    p.add_argument("--roadscene-every", type=int, default=1, help="N > 1: not the rule")
    p.add_argument(
        "--ship",
        action="store_true",
        help="if the rule ships the winner: copy it to dtpf_jax/weights/student_ivf.msgpack and "
        "write its record student_ivf.json beside it",
    )
    args = p.parse_args(argv)
    try:
        sets = selection_sets(args.data, args.roadscene_every)
        models = {"shipped": infer.load_model(args.shipped)} if args.shipped else {}
        names = {}
        for path in args.candidates:
            names[pathlib.Path(path).stem] = path
            models[pathlib.Path(path).stem] = infer.load_model(path)
    except (images.DataError, checkpoint.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    baseline = _baseline()
    weights = losses.default_weights("ivf")
    loss_fn = jax.jit(lambda f, v, i: losses.fusion_loss(f, v, i, weights)[0])  # one per shape
    methods = ["vis", "max", *models]
    rows, t0 = [], time.perf_counter()
    for set_name, pairs in sets.items():
        for k, pair in enumerate(pairs):
            vis, ir = images.read_image(pair.a, "RGB"), images.read_image(pair.b, "L")
            outputs = {"vis": vis, "max": np.repeat(baseline(vis, ir, "max")[..., None], 3, -1)}
            for name, model in models.items():
                outputs[name] = infer.fuse_images(vis, ir, model, mode="full", buckets="coarse")
            v, i = images.to_float(vis)[None], images.to_float(ir)[None]
            for m in methods:
                f = outputs[m]
                loss = float(loss_fn(images.to_float(f)[None], v, i))
                info = metrics.evaluate_pair(f, vis, ir, "dtpf_table", INFO)
                rows.append({"set": set_name, "name": pair.name, "method": m, "loss": loss, **info})
            print(
                f"{set_name} {k + 1}/{len(pairs)} {pair.name}: "
                + " ".join(f"{r['method']} {r['loss']:.3f}" for r in rows[-len(methods) :])
                + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    means = {
        (s, m): {
            k: _mean(r[k] for r in rows if r["set"] == s and r["method"] == m)
            for k in ("loss", *INFO)
        }
        for s in sets
        for m in methods
    }
    scores = {m: statistics.fmean(means[s, m]["loss"] for s in sets) for m in methods}
    verdict = decide(scores, list(names))
    if args.roadscene_every > 1:
        verdict["ships"], verdict["note"] = False, "--roadscene-every > 1: not the rule"
    md = table(sets, methods, means, scores, verdict)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    images.atomic_write(args.out / "selection.md", md + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    images.atomic_write(args.out / "scores.csv", buf.getvalue())
    if verdict["ships"]:
        verdict["record"] = ship_record(names[verdict["winner"]], scores, means, sets)
    images.atomic_write(args.out / "decision.json", json.dumps(verdict, indent=2) + "\n")
    if args.ship and verdict["ships"]:
        images.atomic_write(SHIPPED, pathlib.Path(names[verdict["winner"]]).read_bytes())
        record = json.dumps(verdict["record"], indent=2) + "\n"
        images.atomic_write(SHIPPED.with_suffix(".json"), record)
        print(f"shipped {names[verdict['winner']]} as {SHIPPED} (+ .json)")
    return 0


def table(sets, methods, means, scores, verdict) -> str:
    cols = [f"{s}: {k}" for s in sets for k in ("loss", *INFO)]
    lines = [
        f"Ship rule (scripts/select_student.py): score = mean of the two sets' mean fusion loss; "
        f"sets: {', '.join(f'{s} ({len(p)} pairs)' for s, p in sets.items())}",
        "",
        "| method | score | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for m in methods:
        cells = [f"{means[s, m][k]:.4f}" for s in sets for k in ("loss", *INFO)]
        lines.append(f"| {m} | {scores[m]:.4f} | " + " | ".join(cells) + " |")
    bars = ", ".join(f"{k} {v:.4f}" for k, v in verdict["bars"].items())
    ships = "SHIPS" if verdict["ships"] else "does not ship"
    lines += ["", f"Winner {verdict['winner']} ({verdict['score']:.4f}; bars: {bars}): {ships}."]
    return "\n".join(lines)


def ship_record(path: str, scores: dict, means: dict, sets: dict) -> dict:
    """The record for dtpf_jax/weights/student_ivf.json (tests/test_weights.py checks it)."""
    blob = pathlib.Path(path).read_bytes()
    _, cfg, meta = checkpoint.load_params(path)
    return {
        "file": "student_ivf.msgpack",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        **meta,
        "selection": {
            "rule": "scripts/select_student.py",
            "score": scores[pathlib.Path(path).stem],
            "bars": {m: scores[m] for m in ("shipped", "vis", "max") if m in scores},
            "sets": {s: len(p) for s, p in sets.items()},
            "means": {s: means[s, pathlib.Path(path).stem] for s in sets},
        },
        "config": json.loads(json.dumps(cfg.to_dict(), default=list)),
    }


if __name__ == "__main__":
    sys.exit(main())
