"""Image files: finding and pairing them by name, decoding, checked and atomic writes (8- and
16-bit PNG), the reports' thumbnails; DataError."""

from __future__ import annotations

import base64
import io
import logging
import os
import pathlib
import struct
import tempfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

REPO = pathlib.Path(__file__).resolve().parents[1]
THUMB_SIDE = 192  # the reports' thumbnails fit THUMB_SIDE x THUMB_SIDE
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with input files, stated in one line that names the file and the fix."""


def image_files(folder: str | os.PathLike, recursive: bool = False) -> dict[str, pathlib.Path]:
    """Image files of a folder keyed by basename without extension; with `recursive`, of its
    whole tree keyed by the path relative to it without extension ('day/00001'). Names starting
    with '.' (files and folders) are left out."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass an existing folder of images")
    if recursive:
        paths = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [pathlib.Path(root, f) for f in sorted(files)]
    else:
        paths = sorted(folder.iterdir())
    found: dict[str, pathlib.Path] = {}
    for p in paths:
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            name = p.relative_to(folder).with_suffix("").as_posix()
            if name in found:
                raise DataError(
                    f"{folder}: both {found[name].relative_to(folder)} and "
                    f"{p.relative_to(folder)} have the name '{name}'; keep one file per name"
                )
            found[name] = p
    return found


def pair_files(
    folders: Sequence[str | os.PathLike],
    roles: Sequence[str] | None = None,
    recursive: bool = False,
) -> tuple[list[tuple[str, tuple[pathlib.Path, ...]]], dict[str, list[str]]]:
    """Match the files of several folders by name (`image_files`), never by order.

    Returns the pairs [(name, (path_in_folder0, path_in_folder1, ...)), ...] sorted by name,
    and {name: ['FOLDER (role)', ...]}: the folders that lack a name, for each name that
    some folder lacks.
    Raises DataError when no folder holds an image.
    """
    roles = list(roles or [pathlib.Path(f).name for f in folders])
    files = [image_files(f, recursive) for f in folders]
    names = set().union(*files)
    if not names:
        raise DataError(f"{folders[0]}: no images found ({', '.join(IMAGE_EXTS)})")
    common = sorted(set.intersection(*(set(f) for f in files)))
    missing = {}
    for n in sorted(names - set(common)):
        missing[n] = [
            f"{d} ({r})" for r, d, fs in zip(roles, folders, files, strict=True) if n not in fs
        ]
    return [(n, tuple(fs[n] for fs in files)) for n in common], missing


def pair_by_name(
    folders: Sequence[str | os.PathLike],
    roles: Sequence[str] | None = None,
    recursive: bool = False,
) -> list[tuple[str, tuple[pathlib.Path, ...]]]:
    """The pairs of `pair_files`; raises DataError listing the names missing from some folder."""
    pairs, missing = pair_files(folders, roles, recursive)
    if missing:
        roles = list(roles or [pathlib.Path(f).name for f in folders])
        unmatched = []
        for role, folder in zip(roles, folders, strict=True):
            label = f"{folder} ({role})"
            lacks = [n for n, where in missing.items() if label in where]
            if lacks:
                unmatched.append(f"{len(lacks)} missing in {label}: {abbreviate(lacks)}")
        raise DataError(
            "unmatched file names: "
            + "; ".join(unmatched)
            + "; every image needs a partner with the same basename in each folder"
        )
    return pairs


def abbreviate(names: Sequence[str], k: int = 5) -> str:
    """The first k names, then how many more."""
    shown = ", ".join(names[:k])
    return shown + (f", … (+{len(names) - k} more)" if len(names) > k else "")


def read_image(path: str | os.PathLike, mode: str, bits: int = 8) -> np.ndarray:
    """Decode an image as 'RGB' (H, W, 3) or 'L' (H, W), uint8 (bits=8) or uint16 (bits=16).

    16-bit gray images keep every level at bits=16 and are scaled to 8 bits at bits=8; 8-bit
    images read at bits=16 are scaled by 257 (the same value over the dtype's range). Pillow
    reads 16-bit RGB files at 8 bits. Palette/alpha images are flattened (alpha dropped), gray
    images are repeated to RGB and RGB images converted to gray (BT.601) when asked.
    """
    path = pathlib.Path(path)
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits!r}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                if img.mode == "F":
                    peak = 1.0 if arr.max() <= 1.0 else 255.0
                else:
                    peak = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
                top = 2.0**bits - 1
                gray = np.clip(np.round(arr * (top / peak)), 0, top)
                out = gray.astype(np.uint16 if bits == 16 else np.uint8)
                return out if mode == "L" else np.repeat(out[..., None], 3, -1)
            if img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
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
    return out.astype(np.uint16) * 257 if bits == 16 else out


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
    """Write a PNG atomically: 8-bit for a uint8 image, 16-bit for a uint16 one."""
    arr = np.asarray(image)
    arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    if arr.dtype == np.uint16:
        atomic_write(path, png16(arr))
        return
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def png16(image: np.ndarray) -> bytes:
    """A 16-bit PNG file of a uint16 gray (H, W) or RGB (H, W, 3) image (Pillow writes 16-bit
    gray only): every row with the Up filter, one zlib stream."""
    h, w = image.shape[:2]
    color_type = {2: 0, 3: 2}[image.ndim]  # gray, truecolour
    rows = np.ascontiguousarray(image, ">u2").reshape(h, -1).view(np.uint8)
    up = rows.copy()
    up[1:] -= rows[:-1]  # PNG filter 2 (Up): the byte minus the byte above, modulo 256
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 or uint16 (H, W[, C]) -> float32 in [0, 1] (over the dtype's range), channel axis."""
    top = 65535.0 if image.dtype == np.uint16 else 255.0
    arr = image.astype(np.float32) / np.float32(top)
    return arr[..., None] if arr.ndim == 2 else arr


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 with rounding (clipped)."""
    return np.clip(np.round(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint16 with rounding (clipped)."""
    return np.clip(np.round(np.asarray(image, np.float64) * 65535.0), 0, 65535).astype(np.uint16)


def thumbnail(img: np.ndarray, side: int = THUMB_SIDE) -> Image.Image:
    """`img` shrunk to fit side x side (never enlarged), as the reports show it."""
    thumb = Image.fromarray(img)
    thumb.thumbnail((side, side))
    return thumb


def thumbnail_uri(img: np.ndarray, side: int = THUMB_SIDE) -> str:
    """A PNG data URI of `thumbnail(img, side)`."""
    thumb = thumbnail(img, side)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def refuse_shared(out: str | os.PathLike, flag: str = "--out") -> None:
    """Raise DataError when `out` lies inside the read-only shared reference folder."""
    out = pathlib.Path(out).resolve()
    for shared in {(REPO.parent / "shared").resolve(), pathlib.Path("/work/shared").resolve()}:
        if out == shared or out.is_relative_to(shared):
            raise DataError(
                f"{out}: refusing to write inside {shared} (read-only reference "
                f"data); pass {flag} elsewhere"
            )


def check_output_file(
    path: str | os.PathLike,
    flag: str,
    taken: Mapping[pathlib.Path, str] | None = None,
    input_dirs: Sequence[str | os.PathLike] = (),
) -> pathlib.Path:
    """Raise DataError unless `path` (passed as `flag`) can be written as a file without
    touching anything else; returns it resolved. Refused: a folder; a path in `taken`
    (resolved path -> what it is: 'an input image', 'the fused image of a'); an image file
    added to one of `input_dirs`; a place under a file or inside the shared data. A missing
    folder on the way is fine (the writer creates it)."""
    p = pathlib.Path(path)
    res = p.resolve()
    if p.is_dir():
        raise DataError(f"{flag} {p}: is a folder; name a file (e.g. {p / 'index.html'})")
    if taken and res in taken:
        raise DataError(f"{flag} {p}: is {taken[res]}; name another file")
    if res.suffix.lower() in IMAGE_EXTS:
        for d in input_dirs:
            if res.parent == pathlib.Path(d).resolve():
                raise DataError(
                    f"{flag} {p}: would add an image to the input folder {d}; write it elsewhere"
                )
    refuse_shared(res, flag)
    folder = res.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{flag} {p}: {folder} is a file, not a folder; pass another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {p}: cannot write in {folder}; pass a writable path")
    return res


def show_info_logs(fmt: str = "%(message)s") -> None:
    """Let a command-line run's INFO lines through to stderr. Importing grain (the data
    pipeline does) gives the root logger a handler, after which `logging.basicConfig` does
    nothing and the level stays WARNING, so the level is lowered here as well."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    logging.getLogger().setLevel(logging.INFO)
