"""Dataset layout: splits (folders holding A and B subfolders), pairs, the data config."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

from ml_collections import ConfigDict

from dtpf_jax.images import DataError, pair_by_name

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
