"""Fuse visible + infrared (or CT|PET|SPECT + MRI) pairs into 8-bit PNGs of the input's size.

    python -m dtpf_jax.fuse --vis DIR|FILE --ir DIR|FILE --out DIR [--weights NAME|PATH]
        [--color rgb|ycbcr|gray] [--mode auto|full|tiles] [--buckets auto|fine|coarse]
        [--html FILE]
    python -m dtpf_jax.fuse --weights teacher.msgpack --text "Event Type: Low Light ..." ...
    python -m dtpf_jax.fuse              # built-in demo pair -> ./dtpf_demo/ (index.html)

Folders are paired by basename, ignoring the extension; the output keeps the basename. Every
input is decoded and checked, and the weights, text and output folder are ready, before the
network runs: bad input stops the run with one `error:` line (exit 2) and nothing written.
Each output is written atomically, and inputs are never written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from dtpf_jax import demo, infer
from dtpf_jax.checkpoint import WeightsError
from dtpf_jax.datasets import Pair
from dtpf_jax.images import (
    DataError,
    atomic_write,
    read_image,
    to_float,
    to_uint8,
    write_png_atomic,
)
from dtpf_jax.plan import Job, check_inputs, medical_hint, plan_jobs, prepare_out
from dtpf_jax.text import ClipError

DEMO_DIR = "dtpf_demo"


def text_embeddings(args, model: infer.Model, jobs: Sequence[Job]) -> list:
    """One (1, D) embedding per job for a teacher (from --text or --captions), else Nones."""
    if not model.text_guided:
        if args.text is not None or args.captions:
            raise DataError(
                f"{model.source}: the student is text-free; drop --text/--captions "
                "(they are for a teacher's weights)"
            )
        return [None] * len(jobs)
    if args.text is not None and args.captions:
        raise DataError("--text and --captions: pass one of them, not both")
    if args.text is None and not args.captions:
        raise DataError(
            f'{model.source}: a teacher needs a caption; pass --text "Event Type: ..." '
            "or --captions DIR (a <name>.txt per pair)"
        )
    from dtpf_jax import captions, text

    if args.text is not None:
        strings = [args.text] * len(jobs)
    else:
        strings, missing = [], []
        for j in jobs:
            path = captions.caption_file(
                pathlib.Path(args.captions), Pair(j.name, j.vis, j.ir, ".")
            )
            if path is None:
                missing.append(j.name)
                continue
            records = captions.parse_caption(path.read_text(encoding="utf-8", errors="replace"))
            strings.append(captions.clip_string(records, args.text_mode)[0])
        if missing:
            raise DataError(
                f"{args.captions}: no caption file for {len(missing)} pairs "
                f"({', '.join(missing[:5])}); write <name>.txt there or use --text"
            )
    uniq = sorted(set(strings))
    try:
        emb = dict(zip(uniq, text.embed_strings(uniq, args.clip), strict=True))
    except ImportError as e:
        raise DataError(
            f"--clip {args.clip}: CLIP needs transformers with Flax ({e}); "
            "pip install 'transformers<5'"
        ) from None
    return [emb[s][None] for s in strings]


@dataclasses.dataclass
class Stats:
    """What a run did: images, wall time, compiles and their time."""

    images: int = 0
    seconds: float = 0.0
    compiles: int = 0
    compile_s: float = 0.0
    tiled: int = 0

    @property
    def images_per_s(self) -> float:
        """Images per second after compilation (nan when every image compiled)."""
        steady = self.images - self.compiles
        return steady / (self.seconds - self.compile_s) if steady > 0 else float("nan")


def _load(job: Job) -> tuple[np.ndarray, np.ndarray]:
    return to_float(read_image(job.vis, "RGB")), to_float(read_image(job.ir, "L"))


def _save(job: Job, fused: np.ndarray, vis: np.ndarray, color: str) -> None:
    write_png_atomic(job.out, to_uint8(infer.apply_color(fused, vis, color)))


def run(
    jobs,
    model: infer.Model,
    embs,
    mode: str,
    color: str,
    threshold: int,
    quiet: bool,
    tile_batch: int = 16,
    buckets: str = "coarse",
):
    """Fuse every job and write its PNG atomically; returns Stats.

    Decoding the next pair and encoding finished PNGs run on threads beside the network
    (PIL releases the GIL): on a GPU they otherwise take longer than the fusion itself.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    fuser, stats, t_start = model.fuser, Stats(), time.perf_counter()
    bar = tqdm(total=len(jobs), unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    with ThreadPoolExecutor(2) as pool:
        pending, ahead = [], pool.submit(_load, jobs[0]) if jobs else None
        for k, (job, emb) in enumerate(zip(jobs, embs, strict=True)):
            vis, ir = ahead.result()
            if k + 1 < len(jobs):
                ahead = pool.submit(_load, jobs[k + 1])
            job_mode = infer.pick_mode(mode, *job.size, threshold)
            stats.tiled += job_mode == "tiles"
            traces, t0 = fuser.trace_count, time.perf_counter()
            fused = _fuse_one(job, model, vis, ir, emb, job_mode, tile_batch, buckets)
            if fuser.trace_count > traces:  # this call compiled a new shape
                stats.compiles += 1
                stats.compile_s += time.perf_counter() - t0
            pending.append(pool.submit(_save, job, fused, vis, color))
            while len(pending) > 2:  # bounded: at most 2 finished images wait for their PNG
                pending.pop(0).result()
            stats.images += 1
            stats.seconds = time.perf_counter() - t_start
            bar.update()
            if stats.images > stats.compiles:
                bar.set_postfix_str(f"{stats.images_per_s:.2f} images/s after compile")
        for f in pending:
            f.result()
    stats.seconds = time.perf_counter() - t_start
    bar.close()
    return stats


def _fuse_one(
    job: Job, model: infer.Model, vis, ir, emb, mode: str, tiles: int, buckets: str
) -> np.ndarray:
    try:
        return model.fuser(
            model.params, vis, ir, emb, mode=mode, tile_batch=tiles, buckets=buckets
        )[0]
    except (MemoryError, RuntimeError) as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and not isinstance(e, MemoryError):
            raise
        h, w = job.size
        raise DataError(
            f"{job.vis}: out of memory at {w}x{h} in {mode} mode; use --mode tiles "
            "or a lower --max-full-pixels"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dtpf_jax.fuse",
        description="Fuse image pairs with DTPF. With no arguments: a built-in demo pair, "
        f"written with an HTML page to ./{DEMO_DIR}/.",
    )
    p.add_argument("--vis", "--a", metavar="DIR|FILE", help="visible (or CT/PET/SPECT) images")
    p.add_argument("--ir", "--b", metavar="DIR|FILE", help="infrared (or MRI) images")
    p.add_argument("--out", metavar="DIR", help="output folder, created if missing")
    p.add_argument(
        "--weights",
        default="student",
        metavar="NAME|PATH",
        help="a shipped student: 'student' (infrared-visible, default), 'student_pet_mri', "
        "'student_spect_mri', 'student_ct_mri' (medical: --vis PET/SPECT/CT, --ir MRI); "
        "or a weight file (.msgpack from export or scripts/convert_official.py)",
    )
    p.add_argument("--text", help="caption for a teacher (one for all pairs)")
    p.add_argument("--captions", metavar="DIR", help="teacher: a <name>.txt caption per pair")
    p.add_argument(
        "--text-mode",
        default="template",
        choices=("template", "full"),
        help="--captions: the official event template (default) or the whole caption",
    )
    p.add_argument("--clip", default=infer.DEFAULT_CLIP, help="CLIP folder or hub id (teacher)")
    p.add_argument(
        "--color",
        default="rgb",
        choices=infer.COLORS,
        help="rgb: the network's output (default); ycbcr: fused luma with the visible "
        "image's CbCr; gray: fused luma",
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=infer.MODES,
        help="full: whole image at once; tiles: official 128² tiles, Gaussian-blended, "
        "bounded memory; auto (default): full up to --max-full-pixels, else tiles",
    )
    p.add_argument(
        "--max-full-pixels",
        type=int,
        default=None,
        metavar="N",
        help="mode auto: tiles above N pixels (default $DTPF_MAX_FULL_PIXELS or "
        f"{infer.MAX_FULL_PIXELS}; 0 = never)",
    )
    p.add_argument("--tile-batch", type=int, default=16, metavar="N", help="tiles per call")
    p.add_argument(
        "--buckets",
        default="auto",
        choices=("auto", *infer.BUCKETS),
        help="full mode pads each image to a shape bucket, compiled once per shape: fine "
        "(multiples of 32: least padding), coarse (64, or 128 above 256: fewest compiles); "
        "auto (default): whichever costs less for these images",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--html", metavar="FILE", help="also write a vis | ir | fused HTML page")
    p.add_argument("--demo", action="store_true", help="fuse the built-in demo pair")
    p.add_argument("--no-compile-cache", action="store_true", help="no persistent XLA cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _compile_cache(disabled: bool) -> None:
    """Keep compiled shapes across runs (~25 s per shape on 2 CPU cores) unless set already."""
    import jax

    if disabled or jax.config.jax_compilation_cache_dir:
        return
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    path = pathlib.Path(os.environ.get("DTPF_JAX_CACHE") or pathlib.Path(base) / "dtpf_jax")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home only costs the recompiles
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def fuse_main(args) -> int:
    """The run behind main(); raises DataError / WeightsError / ClipError on bad input."""
    _compile_cache(args.no_compile_cache)
    out = pathlib.Path(args.out)
    if args.demo:
        prepare_out(out)
        args.vis, args.ir = demo.write_inputs(out)
        out = out / "fused"
        args.html = args.html or str(out.parent / "index.html")
    jobs = plan_jobs(args.vis, args.ir, out)
    check_inputs(jobs)
    hint = medical_hint(jobs, args.weights)
    if hint:
        print(hint)
    model = infer.load_model(args.weights, args.dtype)
    embs = text_embeddings(args, model, jobs)
    prepare_out(out)
    threshold = infer.max_full_pixels() if args.max_full_pixels is None else args.max_full_pixels
    big = [j for j in jobs if infer.pick_mode(args.mode, *j.size, threshold) == "tiles"]
    if big and args.mode == "auto":
        print(
            f"note: {_count(len(big), 'image')} above {threshold} pixels run in "
            f"tiles mode (bounded memory), e.g. {big[0].vis}; --max-full-pixels N changes the "
            "threshold"
        )
    buckets = args.buckets
    if buckets == "auto":
        full = [j.size for j in jobs if infer.pick_mode(args.mode, *j.size, threshold) == "full"]
        buckets = infer.choose_buckets(full)
    stats = run(
        jobs,
        model,
        embs,
        args.mode,
        args.color,
        threshold,
        args.quiet,
        max(1, args.tile_batch),
        buckets,
    )
    label = "untrained network, random init" if not model.trained else model.source
    if args.html:
        page = demo.page_html(
            jobs, f"DTPF fusion ({label})", "" if model.trained else infer.UNTRAINED_WARNING
        )
        atomic_write(args.html, page)
        print(f"page: {pathlib.Path(args.html).resolve()}")
    print(
        f"compile: {_count(stats.compiles, 'new shape')} ({buckets} buckets), "
        f"{stats.compile_s:.1f} s (first image of each shape, not counted in images/s)"
    )
    # A rate after compile exists only when some image ran on an already compiled shape.
    ips = (
        f", {stats.images_per_s:.2f} images/s after compile"
        if stats.images > stats.compiles
        else ""
    )
    tiled = f", {stats.tiled} in tiles" if stats.tiled else ""
    print(
        f"done: {_count(stats.images, 'image')}{tiled} in {stats.seconds:.1f} s"
        f"{ips} -> {out.resolve()}"
    )
    return 0


def _count(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'s' * (n != 1)}"


class _LowerFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 on success, 2 with one `error:` line on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv or ["--demo"])
    if args.demo:
        args.out = args.out or DEMO_DIR
    elif not (args.vis and args.ir and args.out):
        print(
            "error: pass --vis, --ir and --out (or no arguments for the demo); see --help",
            file=sys.stderr,
        )
        return 2
    # Warnings as one `warning: ...` line, like the errors.
    logger, handler = logging.getLogger("dtpf_jax"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerFormatter())
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        return fuse_main(args)
    except (DataError, WeightsError, ClipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
