"""Image files: finding and pairing them by name, decoding, atomic writes; DataError."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

REPO = pathlib.Path(__file__).resolve().parents[1]
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
            unmatched.append(f"{len(missing)} missing in {folder} ({role}): {abbreviate(missing)}")
    if unmatched:
        raise DataError(
            "unmatched file names: "
            + "; ".join(unmatched)
            + "; every image needs a partner with the same basename in each folder"
        )
    return [(n, tuple(fs[n] for fs in files)) for n in common]


def abbreviate(names: Sequence[str], k: int = 5) -> str:
    """The first k names, then how many more."""
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


def refuse_shared(out: str | os.PathLike) -> None:
    """Raise DataError when `out` lies inside the read-only shared reference folder."""
    out = pathlib.Path(out).resolve()
    for shared in {(REPO.parent / "shared").resolve(), pathlib.Path("/work/shared").resolve()}:
        if out == shared or out.is_relative_to(shared):
            raise DataError(
                f"{out}: refusing to write inside {shared} (read-only reference "
                "data); pass --out elsewhere"
            )


def show_info_logs(fmt: str = "%(message)s") -> None:
    """Let a command-line run's INFO lines through to stderr. Importing grain (the data
    pipeline does) gives the root logger a handler, after which `logging.basicConfig` does
    nothing and the level stays WARNING, so the level is lowered here as well."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    logging.getLogger().setLevel(logging.INFO)
