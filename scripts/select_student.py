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
and writes that record beside it (tests/test_weights.py checks the pair).

Each image's row is also kept in <out>/cache/ (--cache), keyed by the method (a network by its
weight file's sha256), the pair's two files and the code that makes a row (CODE: the inference,
loss and metric modules, the baseline, jax's version): a run that stops resumes where it stopped,
and the shipped student's and the baselines' rows, computed once, serve every later selection
until that code changes. Fusing is the cost, ~3 s a RoadScene pair and network on an idle
2-core CPU: about 35 minutes for 4 new candidates (183 pairs, a loss compile per RoadScene
size), 45 with the shipped student's rows not yet cached. --roadscene-every 10 scores the 19
pairs at positions 40, 50, ..., 220 (the earlier CPU runs' RoadScene validation) in a few
minutes: a quick look, not the rule, never shipped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import inspect
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
# What a cached row depends on besides the weights and the images (any edit: rows made anew):
# these modules, the baseline function (its source), jax's version and ROW_VERSION, to be
# raised whenever main() changes how a row is made.
CODE = (
    "dtpf_jax/attention.py",
    "dtpf_jax/blocks.py",
    "dtpf_jax/checkpoint.py",
    "dtpf_jax/color.py",
    "dtpf_jax/images.py",
    "dtpf_jax/infer.py",
    "dtpf_jax/losses.py",
    "dtpf_jax/metrics.py",
    "dtpf_jax/networks.py",
    "dtpf_jax/tiling.py",
)
ROW_VERSION = 1


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


def code_key() -> str:
    """A digest of what makes a row (CODE): the rows a cache folder may reuse."""
    baseline = inspect.getsource(_baseline())
    digest = hashlib.sha256(f"{ROW_VERSION}\0{jax.__version__}\0{baseline}".encode())
    for rel in CODE:
        digest.update(rel.encode() + b"\0" + (REPO / rel).read_bytes())
    return digest.hexdigest()[:16]


class RowCache:
    """Rows by method and pair, one JSON-lines file per method under <folder>/<code_key()>/.

    A method's key is its name for the baselines and its weight file's sha256 for a network (a
    candidate renamed, or the same file as the shipped one, is not fused twice). A row is kept
    under its pair's key (set, name and the sha256 of both image files) and appended as soon as
    it is made, so a run that stops keeps what it scored; a half-written last line is ignored.
    """

    def __init__(self, folder: pathlib.Path | None):
        self.folder = folder / code_key() if folder else None
        self.rows: dict[tuple[str, str], dict] = {}
        if self.folder and self.folder.is_dir():
            for path in self.folder.glob("*.jsonl"):
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[path.stem, row.pop("pair")] = row

    def get(self, method_key: str, pair_key: str) -> dict | None:
        return self.rows.get((method_key, pair_key))

    def put(self, method_key: str, pair_key: str, row: dict) -> None:
        self.rows[method_key, pair_key] = row
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"{method_key}.jsonl", "a") as f:
                f.write(json.dumps({"pair": pair_key, **row}) + "\n")


def pair_key(set_name: str, pair: datasets.Pair) -> str:
    digest = hashlib.sha256(f"{set_name}\0{pair.name}".encode())
    for path in (pair.a, pair.b):
        digest.update(pathlib.Path(path).read_bytes())
    return digest.hexdigest()[:24]


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
        "--cache",
        type=pathlib.Path,
        help="folder of per-image rows reused while the code that makes them is unchanged "
        "(default <out>/cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="score every image anew, keep nothing")
    p.add_argument(
        "--ship",
        action="store_true",
        help="if the rule ships the winner: copy it to dtpf_jax/weights/student_ivf.msgpack and "
        "write its record student_ivf.json beside it",
    )
    args = p.parse_args(argv)
    try:
        sets = selection_sets(args.data, args.roadscene_every)
        files = {"shipped": args.shipped} if args.shipped else {}
        for path in args.candidates:
            name = pathlib.Path(path).stem
            if name in ("vis", "max", *files):
                raise images.DataError(f"{path}: a second method named {name!r}; rename the file")
            files[name] = path
        models = {m: infer.load_model(path) for m, path in files.items()}
        keys = {m: checkpoint.file_sha256(path) for m, path in files.items()}
    except (images.DataError, checkpoint.WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = {m: files[m] for m in files if m != "shipped"}
    cache = RowCache(None if args.no_cache else args.cache or args.out / "cache")
    baseline = _baseline()
    weights = losses.default_weights("ivf")
    loss_fn = jax.jit(lambda f, v, i: losses.fusion_loss(f, v, i, weights)[0])  # one per shape
    methods = ["vis", "max", *files]
    keys |= {"vis": "vis", "max": "max"}
    rows, t0, reused = [], time.perf_counter(), 0
    for set_name, pairs in sets.items():
        for k, pair in enumerate(pairs):
            pk = pair_key(set_name, pair)
            found = {m: cache.get(keys[m], pk) for m in methods}
            todo = [m for m in methods if found[m] is None]
            reused += len(methods) - len(todo)
            if todo:
                vis, ir = images.read_image(pair.a, "RGB"), images.read_image(pair.b, "L")
                v, i = images.to_float(vis)[None], images.to_float(ir)[None]
            for m in todo:
                if m == "vis":
                    f = vis
                elif m == "max":
                    f = np.repeat(baseline(vis, ir, "max")[..., None], 3, -1)
                else:
                    f = infer.fuse_images(vis, ir, models[m], mode="full", buckets="coarse")
                loss = float(loss_fn(images.to_float(f)[None], v, i))
                info = metrics.evaluate_pair(f, vis, ir, "dtpf_table", INFO)
                found[m] = {"loss": loss, **{k: float(x) for k, x in info.items()}}
                cache.put(keys[m], pk, found[m])
            rows += [{"set": set_name, "name": pair.name, "method": m, **found[m]} for m in methods]
            print(
                f"{set_name} {k + 1}/{len(pairs)} {pair.name}: "
                + " ".join(f"{m} {found[m]['loss']:.3f}" for m in methods)
                + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    if reused:
        print(f"{reused} of {len(rows)} rows from the cache ({cache.folder})")
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
