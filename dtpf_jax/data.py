"""Grain pipelines over dataset pairs (training crops, whole-image eval), `check` CLI."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from dtpf_jax.datasets import Pair, Split, find_splits, relative_split, source_pairs
from dtpf_jax.images import DataError, abbreviate, image_files, read_image, to_float
from dtpf_jax.text import pair_priors

log = logging.getLogger(__name__)


def check_pair_sizes(pairs: Sequence[Pair], crop: int) -> None:
    """Raise on pairs whose A and B sizes differ; warn once about images smaller than the crop."""
    mismatched, small = [], []
    for p in pairs:
        with Image.open(p.a) as ia, Image.open(p.b) as ib:
            if ia.size != ib.size:
                mismatched.append(
                    f"{p.split}/{p.name} ({ia.size[0]}x{ia.size[1]} vs {ib.size[0]}x{ib.size[1]})"
                )
            elif min(ia.size) < crop:
                small.append(f"{p.split}/{p.name}")
    if mismatched:
        raise DataError(
            f"A and B sizes differ in {len(mismatched)} pairs: {abbreviate(mismatched)}; "
            "register or resize the pairs"
        )
    if small:
        log.warning(
            "%d of %d pairs are smaller than the %d² crop and are reflect-padded: %s",
            len(small),
            len(pairs),
            crop,
            abbreviate(small),
        )


def _records(cfg: ConfigDict, pairs: Sequence[Pair], names: bool = True) -> list[dict]:
    emb, weights = pair_priors(cfg, pairs)
    recs = [
        {"a": p.a, "b": p.b} | ({"name": p.name, "split": p.split} if names else {}) for p in pairs
    ]
    return [r | {"text_emb": e, "weights": w} for r, e, w in zip(recs, emb, weights, strict=True)]


class LoadPair(grain.transforms.Map):
    """Record -> uint8 'vis' (H,W,3) and 'ir' (H,W) plus the record's priors."""

    def map(self, rec: dict) -> dict:
        vis, ir = read_image(rec["a"], "RGB"), read_image(rec["b"], "L")
        if vis.shape[:2] != ir.shape[:2]:
            raise DataError(f"{rec['a']}: size {vis.shape[:2]} differs from {rec['b']} {ir.shape}")
        return {**rec, "vis": vis, "ir": ir}


@dataclasses.dataclass(frozen=True)
class RandomCropFlip(grain.transforms.RandomMap):
    """Same random crop of vis and ir, then joint v-flip, h-flip, 180° rotation (p=0.5 each)."""

    crop: int = 128

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        c = self.crop
        vis, ir = pad_to(ex["vis"], c), pad_to(ex["ir"], c)
        y = int(rng.integers(0, ir.shape[0] - c + 1))
        x = int(rng.integers(0, ir.shape[1] - c + 1))
        vis, ir = vis[y : y + c, x : x + c], ir[y : y + c, x : x + c]
        vflip, hflip, rot = rng.random(3) < 0.5
        if vflip:
            vis, ir = vis[::-1], ir[::-1]
        if hflip:
            vis, ir = vis[:, ::-1], ir[:, ::-1]
        if rot:
            vis, ir = vis[::-1, ::-1], ir[::-1, ::-1]
        return {
            "vis": to_float(vis),
            "ir": to_float(ir),
            "text_emb": ex["text_emb"],
            "weights": ex["weights"],
        }


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad H and W at the bottom/right up to at least `size`."""
    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not ph and not pw:
        return image
    return np.pad(image, [(0, ph), (0, pw)] + [(0, 0)] * (image.ndim - 2), mode="reflect")


def make_train_iter(
    cfg: ConfigDict,
    *,
    global_batch: int,
    seed: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    pairs: Sequence[Pair] | None = None,
) -> grain.DatasetIterator:
    """Endless iterator of training batches (see README); resumable with get_state/set_state.

    `pairs` defaults to all of cfg.train. Several processes: global batch k is elements
    [k*B, (k+1)*B) of one shuffled, augmented stream, exactly as one process would read it;
    process p decodes only its contiguous part [k*B + p*B/n, k*B + (p+1)*B/n), and with `mesh`
    the parts form one global jax.Array in process order. Crops and flips are drawn by the
    element's place in the global stream, so no two processes augment alike.
    """
    n_proc = jax.process_count()
    n_dev = len(mesh.local_devices) if mesh is not None else 1
    if global_batch % (n_proc * n_dev):
        raise ValueError(
            f"global batch {global_batch} is not divisible by {n_proc} processes x {n_dev} devices"
        )
    pairs = source_pairs(cfg, "train") if pairs is None else pairs
    check_pair_sizes(pairs, cfg.crop)
    ds = grain.MapDataset.source(_records(cfg, pairs, names=False))
    ds = ds.seed(cfg.seed if seed is None else seed).shuffle().repeat()
    # grain derives the crops' seed from the depth of the pipeline: the whole-stream slice
    # keeps the depth, hence the crops, of the single-process pipeline before multi-process.
    ds = ds[:].map(LoadPair()).random_map(RandomCropFlip(cfg.crop))
    # Lazy: a process reads only the elements of its own slices of the batches.
    ds = ds.batch(global_batch // n_proc, drop_remainder=True)[jax.process_index() :: n_proc]
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    if mesh is not None:
        from dtpf_jax import parallel

        it = it.map(functools.partial(parallel.shard_batch, mesh=mesh))
    return iter(it)


class LoadEvalPair(grain.transforms.Map):
    """Record -> whole-image float32 'vis' (H,W,3), 'ir' (H,W,1) with name, split and priors."""

    def map(self, rec: dict) -> dict:
        ex = LoadPair().map(rec)
        return {
            "name": rec["name"],
            "split": rec["split"],
            "vis": to_float(ex["vis"]),
            "ir": to_float(ex["ir"]),
            "text_emb": rec["text_emb"],
            "weights": rec["weights"],
        }


def make_eval_pairs(cfg: ConfigDict, role: str = "val") -> grain.MapDataset:
    """Whole-image pairs of cfg.<role> ('val' | 'test') in order; len(ds), ds[i], iter_pairs(ds)."""
    return grain.MapDataset.source(_records(cfg, source_pairs(cfg, role))).map(LoadEvalPair())


def iter_pairs(ds: grain.MapDataset, read_ahead: int = 2) -> Iterator[dict]:
    """Iterate an eval dataset in order, decoding at most `read_ahead` pairs ahead."""
    return iter(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=read_ahead))
    )


# --- `python -m dtpf_jax.data check ROOT` ----------------------------------------------------


def _describe(path: pathlib.Path) -> tuple[tuple[int, int], str]:
    """(W, H) and a mode label ('RGB R=G=B' for 3-channel gray); decodes the whole file."""
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode == "RGB":
            a = np.asarray(img)
            if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
                mode = "RGB R=G=B"
        return img.size, mode


def _sizes_text(sizes: collections.Counter) -> str:
    if len(sizes) <= 3:
        return ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common())
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return f"varies: {len(sizes)} sizes, W {min(ws)}-{max(ws)}, H {min(hs)}-{max(hs)}"


def check_split(split: Split, base: pathlib.Path) -> tuple[list[str], list[str], int]:
    """Report lines, problems (unmatched, unreadable, size mismatch) and pair count of a split."""
    rel, problems = relative_split(split, base), []
    rel = split.path.name if rel == "." else rel
    roles = (split.a_dir.name, split.b_dir.name)
    try:
        files = [image_files(split.a_dir), image_files(split.b_dir)]
    except DataError as e:
        return [f"{rel}: PROBLEM {e}"], [str(e)], 0
    for i in (0, 1):
        missing = sorted(set(files[1 - i]) - set(files[i]))
        if missing:
            problems.append(
                f"{len(missing)} names without a partner in {roles[i]}/: {abbreviate(missing)}"
            )
    sizes, modes = collections.Counter(), [collections.Counter(), collections.Counter()]
    mismatched, colour_b = [], []
    for name in sorted(set(files[0]) & set(files[1])):
        try:
            (sa, ma), (sb, mb) = _describe(files[0][name]), _describe(files[1][name])
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(f"unreadable: {name}: {e}")
            continue
        sizes[sa] += 1
        modes[0][ma] += 1
        modes[1][mb] += 1
        if sa != sb:
            mismatched.append(f"{name} ({sa[0]}x{sa[1]} vs {sb[0]}x{sb[1]})")
        if mb in ("RGB", "RGBA", "P"):
            colour_b.append(name)
    if mismatched:
        problems.append(f"A/B size mismatch in {len(mismatched)} pairs: {abbreviate(mismatched)}")
    mode_text = " | ".join(
        f"{r}: " + ", ".join(f"{m} {n}" for m, n in c.most_common())
        for r, c in zip(roles, modes, strict=True)
    )
    lines = [
        f"{rel}  [{split.kind}: {roles[0]} + {roles[1]}]  {sum(sizes.values())} pairs",
        f"  sizes  {_sizes_text(sizes) or '-'}",
        f"  modes  {mode_text}",
    ]
    if colour_b:
        lines.append(
            f"  note   {len(colour_b)} colour {roles[1]} images are read as luma: "
            f"{abbreviate(colour_b)}"
        )
    lines += [f"  PROBLEM {p}" for p in problems]
    return lines, problems, sum(sizes.values())


def check(root: str | os.PathLike, out=None) -> int:
    """Print a report of every split under `root`; the number of problems found."""
    root, out = pathlib.Path(root), out or sys.stdout
    splits = find_splits(root)
    if not splits:
        print(
            f"{root}: no dataset layout found (vi/ir, Vis/Ir, crop_LR_visible/cropinfrared, "
            "ct|pet|spect + mri)",
            file=out,
        )
        return 1
    n_problems, n_pairs = 0, 0
    for split in splits:
        lines, problems, n = check_split(split, root)
        print("\n".join(lines), file=out)
        n_problems, n_pairs = n_problems + len(problems), n_pairs + n
    print(f"{len(splits)} splits, {n_pairs} pairs, {n_problems} problems", file=out)
    return n_problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtpf_jax.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="report pairs, sizes, modes and problems under ROOT")
    p.add_argument("root")
    args = parser.parse_args(argv)
    try:
        return 1 if check(args.root) else 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
