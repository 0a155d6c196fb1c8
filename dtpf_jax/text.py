"""Caption strings -> Flax CLIP embeddings (cached), the pairs' text priors; the text CLI."""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
from ml_collections import ConfigDict

from dtpf_jax.captions import caption_dir, caption_tree, pair_texts
from dtpf_jax.datasets import Pair, find_splits, relative_split, split_pairs
from dtpf_jax.images import REPO, DataError, refuse_shared, show_info_logs
from dtpf_jax.losses import TASK_TABLES, task_weights

log = logging.getLogger(__name__)

BPE_FILE = REPO / "third_party" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_TOKENS = 77


def embeddings_path(cfg: ConfigDict) -> pathlib.Path:
    """The embedding cache the pipeline reads (cfg.embeddings or <captions>/clip_<mode>.npz)."""
    return pathlib.Path(cfg.embeddings or pathlib.Path(cfg.captions) / f"clip_{cfg.text_mode}.npz")


def pair_priors(cfg: ConfigDict, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    """(N, text_dim) embeddings and (N, 5) task weights of pairs; no captions -> zeros, default.

    text_dim 0 (a text-free network): the captions set the task weights only and no embedding
    cache is read.
    """
    table = TASK_TABLES[cfg.kind]
    if not cfg.captions:
        log.info("no captions configured: zero text embeddings and 'default' weights")
        return (
            np.zeros((len(pairs), cfg.text_dim), np.float32),
            np.tile(task_weights([], table), (len(pairs), 1)),
        )
    strings, events = pair_texts(cfg, pairs)
    weights = np.stack([task_weights(e, table) for e in events])
    if not cfg.text_dim:
        return np.zeros((len(pairs), 0), np.float32), weights
    path = embeddings_path(cfg)
    cache = load_cache(path)
    lookup = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    lost = sorted(set(strings) - set(lookup))
    if lost:
        raise DataError(
            f"{path}: {len(lost)} caption strings have no cached embedding (e.g. {lost[0]!r}); run "
            f"`python -m dtpf_jax.text embed {cfg.root} --captions {cfg.captions} --mode "
            f"{cfg.text_mode} --clip PATH`"
        )
    emb = np.stack([lookup[s] for s in strings]).astype(np.float32)
    if emb.shape[1] != cfg.text_dim:
        raise DataError(f"{path}: embeddings are {emb.shape[1]}-d, data.text_dim is {cfg.text_dim}")
    log.info("text embeddings from %s (model %s)", path, cache["model"])
    return emb, weights


# --- CLIP tokenizer, model, embedding cache -----------------------------------------------------


class ClipError(RuntimeError):
    """CLIP weights or vocabulary could not be found; the message says how to provide them."""


@functools.cache
def clip_tokenizer():
    """CLIPTokenizerFast built offline from the vendored BPE file (third_party/clip_bpe)."""
    from transformers import CLIPTokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    if not BPE_FILE.is_file():
        raise ClipError(f"{BPE_FILE} is missing; restore third_party/clip_bpe from the repository")
    merges = (
        gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (pathlib.Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizerFast(
            vocab_file=f"{d}/vocab.json",
            merges_file=f"{d}/merges.txt",
            model_max_length=CLIP_MAX_TOKENS,
        )


def load_clip(name_or_path: str):
    """FlaxCLIPTextModelWithProjection from a save_pretrained folder or a hub id."""
    from transformers import FlaxCLIPTextModelWithProjection

    try:
        return FlaxCLIPTextModelWithProjection.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ClipError(
            f"cannot load CLIP text model {name_or_path!r} ({type(e).__name__}); pass --clip "
            "/path/to/clip-vit-base-patch32 (a save_pretrained folder with config.json and "
            "flax_model.msgpack) or a hub id with network access; offline stand-in: "
            "`python -m dtpf_jax.text make-random-clip DIR`"
        ) from None


def embed_strings(strings: Sequence[str], clip: str, batch: int = 32) -> np.ndarray:
    """(N, projection_dim) unnormalised CLIP text embeddings, jitted at one fixed batch shape."""
    import jax

    model, tok = load_clip(clip), clip_tokenizer()
    fn = jax.jit(lambda p, ids, mask: model(ids, mask, params=p).text_embeds)
    out = []
    for i in range(0, len(strings), batch):
        chunk = list(strings[i : i + batch])
        enc = tok(
            chunk + [""] * (batch - len(chunk)),
            padding="max_length",
            truncation=True,
            max_length=CLIP_MAX_TOKENS,
            return_tensors="np",
        )
        out.append(
            np.asarray(fn(model.params, enc["input_ids"], enc["attention_mask"]))[: len(chunk)]
        )
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def model_id(clip: str) -> str:
    """Cache identity of a CLIP checkpoint: hub id, or folder + fingerprint of its files."""
    p = pathlib.Path(clip)
    if not p.is_dir():
        return clip
    h = hashlib.sha1()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.msgpack")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{p.resolve()}#{h.hexdigest()[:12]}"


def strings_digest(strings: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(sorted(set(strings))).encode()).hexdigest()


def load_cache(path: str | os.PathLike) -> dict:
    """The embedding cache: strings, embeddings, model, digest, mode."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no embedding cache; run `python -m dtpf_jax.text embed ROOT "
            "--captions DIR --clip PATH`"
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: (z[k] if z[k].ndim else z[k].item()) for k in z.files}


def update_cache(path: str | os.PathLike, strings: Sequence[str], clip: str, mode: str) -> bool:
    """Embed the distinct strings into `path` unless it already holds them for this model.

    Returns True when the cache was reused unchanged; strings kept from a cache of the same
    model are not recomputed.
    """
    path, uniq, mid = pathlib.Path(path), sorted(set(strings)), model_id(clip)
    digest, old = strings_digest(uniq), {}
    if path.is_file():
        cache = load_cache(path)
        if cache["model"] == mid and cache["digest"] == digest:
            return True
        if cache["model"] == mid:
            old = dict(zip(cache["strings"].tolist(), cache["embeddings"], strict=True))
    todo = [s for s in uniq if s not in old]
    new = dict(zip(todo, embed_strings(todo, clip), strict=True)) if todo else {}
    emb = np.stack([new[s] if s in new else old[s] for s in uniq]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(
        tmp,
        strings=np.asarray(uniq, dtype=str),
        embeddings=emb,
        model=mid,
        digest=digest,
        mode=mode,
    )
    os.replace(tmp, path)
    return False


TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def make_random_clip(out_dir: str | os.PathLike, seed: int = 0, size: str = "tiny") -> pathlib.Path:
    """Write a random CLIP text tower + tokenizer; its embeddings are codes, not semantics.

    'tiny' = hidden 64, 2 layers; 'base' = the ViT-B/32 text config (63 M values, 242 MB).
    Weights N(0, 0.02), LayerNorm scales 1, biases 0, drawn with numpy from `seed`.
    """
    import jax
    from transformers import CLIPTextConfig, FlaxCLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, projection_dim=512, **(TINY_CLIP if size == "tiny" else {})
    )
    model = FlaxCLIPTextModelWithProjection(config, _do_init=False)
    shapes = jax.eval_shape(
        lambda key: model.init_weights(key, (1, CLIP_MAX_TOKENS)), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, float(name == "scale"), leaf.dtype)
        return rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)

    out = pathlib.Path(out_dir)
    model.save_pretrained(out, params=jax.tree_util.tree_map_with_path(fill, shapes))
    clip_tokenizer().save_pretrained(out)
    return out


def tree_strings(root: str | os.PathLike, captions: str | os.PathLike, mode: str) -> list[str]:
    """CLIP strings of the captioned pairs under `root` (splits without captions skipped)."""
    root, strings = pathlib.Path(root), []
    write = f"write them first: python -m dtpf_jax.text caption {root} --out {captions}"
    if not pathlib.Path(captions).is_dir():
        raise DataError(f"{captions}: no caption folder; {write}")
    for split in find_splits(root):
        rel = relative_split(split, root)
        if not caption_dir(captions, rel).is_dir():
            print(f"{rel}: no caption folder in {captions}, skipped")
            continue
        cfg = ConfigDict({"captions": str(captions), "kind": split.kind, "text_mode": mode})
        strings += pair_texts(cfg, split_pairs(split, root))[0]
    if not strings:
        raise DataError(f"{captions}: no captions of any pair under {root}; {write}")
    return strings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtpf_jax.text")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("caption", help="measure every pair under ROOT and write caption files")
    p.add_argument("root")
    p.add_argument("--out", required=True, help="caption tree to write (mirrors ROOT)")
    p = sub.add_parser("embed", help="cache the CLIP embedding of every distinct caption string")
    p.add_argument("root")
    p.add_argument("--captions", required=True, help="caption tree mirroring ROOT")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="folder or hub id")
    p.add_argument("--mode", default="template", choices=("template", "full"))
    p.add_argument("--out", help="cache file (default: <captions>/clip_<mode>.npz)")
    p = sub.add_parser("make-random-clip", help="write a random CLIP text tower (offline stand-in)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=("tiny", "base"))
    args = parser.parse_args(argv)
    show_info_logs("%(levelname)s %(message)s")
    try:
        if args.cmd == "caption":
            for rel, c in caption_tree(args.root, args.out).items():
                n = c.pop("pairs")
                print(f"{rel}: {n} pairs; " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        elif args.cmd == "embed":
            out = pathlib.Path(args.out or pathlib.Path(args.captions) / f"clip_{args.mode}.npz")
            refuse_shared(out)
            strings = tree_strings(args.root, args.captions, args.mode)
            reused = update_cache(out, strings, args.clip, args.mode)
            print(
                f"{out}: {len(set(strings))} distinct strings, {'reused' if reused else 'written'}"
            )
        else:
            refuse_shared(args.out)
            print(make_random_clip(args.out, args.seed, args.size))
    except (DataError, ClipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
