"""Names and layouts of the official PyTorch state dicts <-> our Flax params.

The official tensors are listed in ../shared/official_keys/*.tsv. Our module names follow
them, with three systematic differences: list indices are joined with '_'
(`encoder_level1.0` -> `encoder_level1_0`), wrapper modules without parameters are dropped
(`norm1.body`, `rel_pos_emb`, `patch_embed.proj` -> `patch_embed_proj`), and kernels are
stored channels-last.
"""

from __future__ import annotations

import re

import numpy as np


def flax_path(name: str) -> tuple[str, ...]:
    """Official tensor name -> path in our params tree (CLIP entries are not ours)."""
    parts = name.split(".")
    out: list[str] = []
    for p in parts[:-1]:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        elif p == "rel_pos_emb" or (p == "body" and _is_norm(out)):
            continue
        else:
            out.append(p)
    if out[-2:] == ["patch_embed", "proj"]:
        out[-2:] = ["patch_embed_proj"]
    leaf = parts[-1]
    out.append("kernel" if leaf == "weight" and not _is_norm(out) else leaf)
    return tuple(out)


def _is_norm(path: list[str]) -> bool:
    return bool(path) and re.fullmatch(r"norm\d", path[-1]) is not None


def to_flax(name: str, value: np.ndarray) -> np.ndarray:
    """Official tensor -> our layout (conv OIHW -> HWIO / (I, O), depthwise -> (3, 3, C))."""
    v = np.asarray(value)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "temperature":
        return v.reshape(-1)
    if v.ndim == 4:
        if v.shape[2:] == (1, 1):
            return v[:, :, 0, 0].T
        if v.shape[1] == 1 and ("dwconv" in name):
            return v[:, 0].transpose(1, 2, 0)
        return v.transpose(2, 3, 1, 0)
    if v.ndim == 2 and leaf == "weight" and ".fc." in name:
        return v.T
    return v


def to_torch(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_flax`, given the official shape."""
    v = np.asarray(value)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "temperature":
        return v.reshape(shape)
    if len(shape) == 4:
        if shape[2:] == (1, 1):
            return v.T[:, :, None, None]
        if shape[1] == 1 and "dwconv" in name:
            return v.transpose(2, 0, 1)[:, None]
        return v.transpose(3, 2, 0, 1)
    if len(shape) == 2 and leaf == "weight" and ".fc." in name:
        return v.T
    return v.reshape(shape)


def read_keys_tsv(path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) rows of an official_keys/*.tsv file."""
    rows = []
    with open(path) as f:
        next(f)
        for line in f:
            name, shape, _ = line.rstrip("\n").split("\t")
            rows.append((name, tuple(int(s) for s in shape.split("x"))))
    return rows


def is_clip_key(name: str) -> bool:
    """The official teacher state dict embeds the whole CLIP model under `model_clip.`."""
    return name.startswith(("model_clip.", "clip."))
