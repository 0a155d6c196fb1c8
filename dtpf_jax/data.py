"""Paired image sources: layouts, pairing by name, decoding, grain pipelines, `check` CLI."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import io
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from ml_collections import ConfigDict
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with input files, stated in one line that names the file and the fix."""


def image_files(folder: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Image files of a folder keyed by basename without extension."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass an existing folder of images")
    found: dict[str, pathlib.Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(
                    f"{folder}: both {found[p.stem].name} and {p.name} have the name "
                    f"'{p.stem}'; keep one file per name"
                )
            found[p.stem] = p
    return found


def pair_by_name(
    folders: Sequence[str | os.PathLike], roles: Sequence[str] | None = None
) -> list[tuple[str, tuple[pathlib.Path, ...]]]:
    """Match the files of several folders by basename (ignoring extension), never by order.

    Returns [(name, (path_in_folder0, path_in_folder1, ...)), ...] sorted by name.
    Raises DataError listing the names missing from some folder, or when nothing matches.
    """
    roles = list(roles or [pathlib.Path(f).name for f in folders])
    files = [image_files(f) for f in folders]
    names = set().union(*files)
    common = sorted(set.intersection(*(set(f) for f in files)))
    if not names:
        raise DataError(f"{folders[0]}: no images found ({', '.join(IMAGE_EXTS)})")
    unmatched = []
    for role, folder, fs in zip(roles, folders, files, strict=True):
        missing = sorted(names - set(fs))
        if missing:
            unmatched.append(f"{len(missing)} missing in {folder} ({role}): {_short(missing)}")
    if unmatched:
        raise DataError(
            "unmatched file names: "
            + "; ".join(unmatched)
            + "; every image needs a partner with the same basename in each folder"
        )
    return [(n, tuple(fs[n] for fs in files)) for n in common]


def _short(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", … (+{len(names) - k} more)" if len(names) > k else "")


def read_image(path: str | os.PathLike, mode: str) -> np.ndarray:
    """Decode an image as uint8 'RGB' (H, W, 3) or 'L' (H, W).

    16-bit images are scaled to 8 bits, palette/alpha images are flattened (alpha dropped),
    gray images are repeated to RGB and RGB images converted to gray (BT.601) when asked.
    """
    path = pathlib.Path(path)
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
                arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr, mode="L")
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                scale = 255.0 if arr.max() <= 1.0 else 1.0
                img = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8))
            elif img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                img = img.convert("RGBA" if img.mode in ("P", "PA") else "RGB")
            out = np.asarray(img.convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file; remove it or convert it to PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{path}: cannot decode ({e}); the file may be truncated or corrupt"
        ) from None
    return out


def atomic_write(path: str | os.PathLike, payload: bytes | str) -> None:
    """Write a file so that a reader never sees it half-written (temp file + rename).

    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = pathlib.Path(path)
    data = payload.encode() if isinstance(payload, str) else payload
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an 8-bit PNG atomically."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 image, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(
        buf, format="PNG"
    )
    atomic_write(path, buf.getvalue())


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, C]) -> float32 in [0, 1] with a channel axis."""
    arr = image.astype(np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 with rounding (clipped)."""
    return np.clip(np.round(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)


log = logging.getLogger(__name__)


def show_info_logs(fmt: str = "%(message)s") -> None:
    """Let a command-line run's INFO lines through to stderr. Importing grain (as this module
    does) gives the root logger a handler, after which `logging.basicConfig` does nothing and
    the level stays WARNING, so the level is lowered here as well."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    logging.getLogger().setLevel(logging.INFO)


# Default dataset root: $DTPF_DATA, else ../shared/data beside the repository.
DATA_ROOT = os.environ.get(
    "DTPF_DATA", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
)


def default_config(kind: str = "ivf") -> ConfigDict:
    """Data config; configs/*.py call this and override fields."""
    if kind not in ("ivf", "medical"):
        raise ValueError(f"kind must be 'ivf' or 'medical', not {kind!r}")
    ivf = kind == "ivf"
    c = ConfigDict()
    c.kind = kind  # 'ivf' | 'medical': task-weight table (losses.TASK_TABLES) and layouts accepted
    c.root = DATA_ROOT  # base of relative folders below and of the caption tree
    # Folders, each a split (holding vi/ir, Vis/Ir, ct|pet|spect + mri…) or a tree of splits.
    c.train = ("msrs/train",) if ivf else ("harvard/pet_mri/train",)  # combined for training
    c.train_split = (0.0, 0.95)  # (lo, hi) fraction of each split's name-sorted pairs
    c.val = c.train  # validation folders (official: last 5 % of the train folder)
    c.val_split = (0.95, 1.0)
    c.test = ("msrs/test",) if ivf else ("harvard/pet_mri/test",)  # test folders, used whole
    c.test_split = (0.0, 1.0)
    c.crop = 128  # training crop side; smaller images are reflect-padded (one warning)
    # Caption tree mirroring `root` (as `python -m dtpf_jax.text caption ROOT --out DIR` writes
    # it): files for split <root>/P are read from <captions>/P (or <captions>/P/text).
    # '' = no captions: every sample gets the 'default' weights and an all-zero embedding.
    c.captions = ""
    c.text_mode = "template"  # 'template' (official: event names only) | 'full' (whole caption)
    c.embeddings = ""  # embedding cache; '' = <captions>/clip_<text_mode>.npz
    c.text_dim = 512  # text-embedding width (CLIP ViT-B/32 projection)
    c.seed = 3407  # shuffle/augmentation seed when make_train_iter gets none (official seed)
    c.num_workers = 0  # grain worker processes (each pool costs seconds to start)
    c.read_threads = 2  # threads decoding samples in each process
    c.prefetch = 8  # batches read ahead per process
    return c


def resolve_folder(cfg: ConfigDict, entry: str) -> pathlib.Path:
    """A config folder entry, absolute or relative to cfg.root."""
    p = pathlib.Path(os.path.expanduser(entry))
    return p if p.is_absolute() else pathlib.Path(cfg.root) / p


# (A folder, B folder) names of IVF layouts, compared lower-case, in order of preference.
IVF_LAYOUTS = (("vi", "ir"), ("vis", "ir"), ("crop_lr_visible", "cropinfrared"))
MED_A = ("ct", "pet", "spect")
MED_B = "mri"
_SKIP_DIRS = {"text", "captions", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Split:
    """A folder whose A and B subfolders hold one dataset split, paired by name."""

    path: pathlib.Path
    a_dir: pathlib.Path
    b_dir: pathlib.Path
    kind: str  # 'ivf' | 'medical'


@dataclasses.dataclass(frozen=True)
class Pair:
    """One image pair; `split` is its split folder relative to the dataset root ('.' if equal)."""

    name: str
    a: str
    b: str
    split: str


def split_of(folder: str | os.PathLike) -> Split | None:
    """The Split held directly by `folder` (IVF vi/ir-like or medical ct|pet|spect + mri)."""
    folder = pathlib.Path(folder)
    subs = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    for a, b in IVF_LAYOUTS:
        if a in subs and b in subs:
            return Split(folder, subs[a], subs[b], "ivf")
    for a in MED_A:
        if a in subs and MED_B in subs:
            return Split(folder, subs[a], subs[MED_B], "medical")
    return None


def find_splits(root: str | os.PathLike, max_depth: int = 5) -> list[Split]:
    """Every Split at or below `root` (the root itself when it is one), sorted by path."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; pass a dataset folder")
    found, todo = [], [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        split = split_of(folder)
        if split is not None:
            found.append(split)
        elif depth < max_depth:
            for p in sorted(folder.iterdir()):
                if p.is_dir() and p.name.lower() not in _SKIP_DIRS and not p.name.startswith("."):
                    todo.append((p, depth + 1))
    return sorted(found, key=lambda s: str(s.path))


def relative_split(split: Split, base: str | os.PathLike) -> str:
    """POSIX path of a split folder relative to `base` ('.' when equal)."""
    return pathlib.Path(
        os.path.relpath(split.path.resolve(), pathlib.Path(base).resolve())
    ).as_posix()


def span_slice(n: int, span: Sequence[float]) -> slice:
    """Index range [floor(lo·n), floor(hi·n)) of a (lo, hi) fraction of n sorted items."""
    lo, hi = float(span[0]), float(span[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"split range must satisfy 0 <= lo <= hi <= 1, got {tuple(span)}")
    return slice(int(lo * n + 1e-9), int(hi * n + 1e-9))


def split_pairs(
    split: Split, base: str | os.PathLike, span: Sequence[float] = (0, 1)
) -> list[Pair]:
    """Pairs of a split within the fraction `span` of its name-sorted list."""
    pairs = pair_by_name([split.a_dir, split.b_dir], roles=("A", "B"))
    rel = relative_split(split, base)
    return [Pair(n, str(a), str(b), rel) for n, (a, b) in pairs[span_slice(len(pairs), span)]]


def source_pairs(cfg: ConfigDict, role: str = "train") -> list[Pair]:
    """Pairs of the cfg.<role> folders within cfg.<role>_split, in config then name order."""
    pairs: list[Pair] = []
    for entry in cfg[role]:
        folder = resolve_folder(cfg, entry)
        splits = find_splits(folder)
        if not splits:
            raise DataError(
                f"{folder}: no dataset layout found (vi/ir, Vis/Ir, crop_LR_visible/cropinfrared, "
                f"ct|pet|spect + mri); check data.{role} and data.root"
            )
        inside = folder.resolve().is_relative_to(pathlib.Path(cfg.root).resolve())
        for split in splits:
            if split.kind != cfg.kind:
                raise DataError(f"{split.path}: {split.kind} layout but data.kind is {cfg.kind!r}")
            pairs += split_pairs(split, cfg.root if inside else folder, cfg[f"{role}_split"])
    if not pairs:
        raise DataError(
            f"data.{role}: no pairs in {list(cfg[role])} for range {cfg[role + '_split']}"
        )
    return pairs


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
            f"A and B sizes differ in {len(mismatched)} pairs: {_short(mismatched)}; "
            "register or resize the pairs"
        )
    if small:
        log.warning(
            "%d of %d pairs are smaller than the %d² crop and are reflect-padded: %s",
            len(small),
            len(pairs),
            crop,
            _short(small),
        )


def _records(cfg: ConfigDict, pairs: Sequence[Pair], names: bool = True) -> list[dict]:
    from dtpf_jax import text  # text imports this module

    emb, weights = text.pair_priors(cfg, pairs)
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
) -> grain.DatasetIterator:
    """Endless iterator of training batches (see README); resumable with get_state/set_state."""
    n_proc = jax.process_count()
    n_dev = len(mesh.local_devices) if mesh is not None else 1
    if global_batch % (n_proc * n_dev):
        raise ValueError(
            f"global batch {global_batch} is not divisible by {n_proc} processes x {n_dev} devices"
        )
    pairs = source_pairs(cfg, "train")
    check_pair_sizes(pairs, cfg.crop)
    ds = grain.MapDataset.source(_records(cfg, pairs, names=False))
    ds = ds.seed(cfg.seed if seed is None else seed)
    ds = ds.shuffle().repeat()[jax.process_index() :: n_proc]
    ds = ds.map(LoadPair()).random_map(RandomCropFlip(cfg.crop))
    ds = ds.batch(global_batch // n_proc, drop_remainder=True)
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
                f"{len(missing)} names without a partner in {roles[i]}/: {_short(missing)}"
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
        problems.append(f"A/B size mismatch in {len(mismatched)} pairs: {_short(mismatched)}")
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
            f"{_short(colour_b)}"
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
