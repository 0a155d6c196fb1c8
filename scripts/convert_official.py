"""Convert an official DTPF PyTorch state dict into a dtpf_jax weight file for `fuse`.

    pip install -e '.[convert]'     # torch: needed for .pth files only
    python scripts/convert_official.py distill_epoch999_quality0.9368.pth student_official.msgpack
    python -m dtpf_jax.fuse --weights student_official.msgpack --vis VIS --ir IR --out OUT

The official DTPF weights (github.com/Zirconium233/DTPF, `Experiments/EXP_IVF/*.pth`, see
DESIGN.md §6) carry no licence, so they are never redistributed with dtpf_jax, converted or
not: download them yourself and convert them locally.

Input: a `.pth` (a state dict, or a checkpoint holding one under 'state_dict' / 'model'; a
prefix such as 'module.' or 'student.' is found and stripped) or a `.npz` of the same names,
which needs no torch. Student or teacher is told by the names (the teacher has FiLM layers,
`prompt_guidance_*`). A teacher's CLIP entries (`model_clip.*`) are dropped: dtpf_jax embeds
text with its own CLIP. The teacher is converted with film_form='official' (gamma * F + beta,
what its weights were trained with). Every tensor name and shape is checked against our network
and, when found, against official_keys/<kind>_state_dict.tsv (--keys DIR, default
../shared/official_keys); unknown, missing or misshapen names are reported in one line.

The torch-free core is `state_dict_to_params` / `params_to_state_dict` (tests call them).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np

from dtpf_jax import networks, official

ANCHOR = "encoder_A.patch_embed.proj.weight"  # in every DTPF network, student and teacher
DEFAULT_KEYS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "official_keys"


class ConversionError(ValueError):
    """A state dict that is not an official DTPF network; the message is one line."""


def model_config(kind: str):
    """The network an official `kind` state dict fits (the teacher with the code's FiLM)."""
    cfg = networks.model_config(kind)
    if kind == "teacher":
        cfg.film_form = "official"
    return cfg


def expected_shapes(kind: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> shape of every param of our `kind` network (traced, nothing compiled)."""
    import jax
    from flax.traverse_util import flatten_dict

    model = networks.build_model(model_config(kind))
    tree = jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}


def _short(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", … (+{len(names) - k})" if len(names) > k else "")


def _problems(unknown: list[str], missing: list[str], bad: list[str]) -> str:
    """'2 unknown names (a, b), 1 missing (c)': the non-empty groups only."""
    groups = (("unknown names", unknown), ("missing", missing), ("of another shape", bad))
    return ", ".join(f"{len(v)} {label} ({_short(v)})" for label, v in groups if v)


def strip_prefix(sd: dict[str, np.ndarray], prefix: str | None = None) -> dict[str, np.ndarray]:
    """The entries under the one network in `sd`, with its prefix ('module.', ...) removed."""
    if prefix is None:
        found = sorted({k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)})
        if not found:
            raise ConversionError(f"no '{ANCHOR}' entry: not a DTPF student or teacher state dict")
        if len(found) > 1:
            raise ConversionError(
                f"several networks in the file (prefixes {', '.join(map(repr, found))}); "
                "choose one with --prefix"
            )
        prefix = found[0]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def detect_kind(names: Sequence[str]) -> str:
    """'teacher' when the names hold FiLM layers (prompt_guidance_*), else 'student'."""
    return "teacher" if any(n.startswith("prompt_guidance") for n in names) else "student"


def state_dict_to_params(sd: dict[str, np.ndarray], kind: str | None = None):
    """Official names -> (params tree in our layout, kind, number of CLIP entries dropped)."""
    from flax.traverse_util import unflatten_dict

    clip = [k for k in sd if official.is_clip_key(k)]
    sd = {k: v for k, v in sd.items() if not official.is_clip_key(k)}
    kind = kind or detect_kind(list(sd))
    want = expected_shapes(kind)
    flat, unknown, bad, seen = {}, [], [], {}
    for name, value in sorted(sd.items()):
        path = official.flax_path(name)
        if path not in want:
            unknown.append(name)
            continue
        if path in seen:
            raise ConversionError(f"{name} and {seen[path]} map to the same parameter")
        seen[path] = name
        v = official.to_flax(name, np.asarray(value, np.float32))
        if tuple(v.shape) != want[path]:
            bad.append(f"{name} {tuple(np.shape(value))}")
        flat[path] = v
    missing = sorted(".".join(p) for p in set(want) - set(flat))
    if unknown or missing or bad:
        raise ConversionError(
            f"not the official DTPF {kind}: {_problems(unknown, missing, bad)}; is it a "
            "DTPF checkpoint of another configuration?"
        )
    return unflatten_dict(flat), kind, len(clip)


def params_to_state_dict(params, rows: Sequence[tuple[str, tuple[int, ...]]]):
    """Our params -> official names and layouts, for the (name, shape) rows of a keys tsv."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    return {
        name: official.to_torch(name, np.asarray(flat[official.flax_path(name)]), shape)
        for name, shape in rows
        if not official.is_clip_key(name)
    }


def check_keys(sd: dict[str, np.ndarray], rows: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Raise unless the non-CLIP names and shapes equal the official keys table."""
    want = {n: s for n, s in rows if not official.is_clip_key(n)}
    got = {n: tuple(np.shape(v)) for n, v in sd.items() if not official.is_clip_key(n)}
    unknown, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    bad = sorted(n for n in set(got) & set(want) if got[n] != want[n])
    if unknown or missing or bad:
        raise ConversionError(f"differs from the official keys: {_problems(unknown, missing, bad)}")


def load_state_dict(path: str | pathlib.Path, trust: bool = False) -> dict[str, np.ndarray]:
    """name -> float32 array from a .npz, or a .pth (state dict or checkpoint; needs torch).

    `trust` unpickles arbitrary objects (full training checkpoints): only for trusted files.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], np.float32) for k in z.files}
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading .pth needs torch: pip install -e '.[convert]' (or save the state "
            "dict as .npz: np.savez(f, **{k: v.numpy() for k, v in sd.items()}))"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch raises many types for a bad or unsafe file
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its messages
        first = text.splitlines()[0] if text else ""
        hint = "" if trust else "; a full training checkpoint you trust: add --trust-pickle"
        raise ConversionError(f"{path}: cannot read ({type(e).__name__}: {first}){hint}") from None
    for key in ("state_dict", "model", "params"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {
        k: v.detach().float().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)
    }


def convert(
    src: str | pathlib.Path,
    dst: str | pathlib.Path,
    keys_dir: str | pathlib.Path | None = DEFAULT_KEYS,
    prefix: str | None = None,
    trust: bool = False,
) -> str:
    """Convert `src` into the weight file `dst`; returns a one-line summary."""
    from dtpf_jax import checkpoint

    src = pathlib.Path(src)
    raw = load_state_dict(src, trust)
    sd = strip_prefix(raw, prefix)
    kind = detect_kind([k for k in sd if not official.is_clip_key(k)])
    tsv = pathlib.Path(keys_dir) / f"{kind}_state_dict.tsv" if keys_dir else None
    checked = tsv is not None and tsv.is_file()
    if checked:  # first: its message names official tensors
        check_keys(sd, official.read_keys_tsv(tsv))
    params, kind, n_clip = state_dict_to_params(sd, kind)
    meta = {
        "source": "official DTPF (github.com/Zirconium233/DTPF); no licence: do not redistribute",
        "file": src.name,
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "kind": kind,
    }
    sha = checkpoint.save_params(dst, params, model_config(kind), meta)
    n = sum(np.size(v) for k, v in sd.items() if not official.is_clip_key(k))
    return (
        f"{dst}: official {kind}, {len(sd) - n_clip} tensors, {n:,} values"
        + (f", {n_clip} CLIP entries dropped" if n_clip else "")
        + (
            f", {len(raw) - len(sd)} entries outside the network ignored"
            if len(raw) > len(sd)
            else ""
        )
        + (f", names checked against {tsv}" if checked else ", no official_keys table found")
        + f"; sha256 {sha[:12]}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="official state dict: .pth (needs torch) or .npz")
    p.add_argument("dst", help="weight file to write (.msgpack), for `fuse --weights`")
    p.add_argument("--keys", default=str(DEFAULT_KEYS), help="folder of official_keys/*.tsv")
    p.add_argument("--prefix", help="entry prefix of the network (default: found)")
    p.add_argument(
        "--trust-pickle", action="store_true", help="unpickle any object (trusted files only)"
    )
    args = p.parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.keys, args.prefix, args.trust_pickle))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
