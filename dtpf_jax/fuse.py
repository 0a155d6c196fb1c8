"""Fuse visible + infrared (or CT|PET|SPECT + MRI) pairs into 8- or 16-bit PNGs of the input's size.

    python -m dtpf_jax.fuse --vis DIR|FILE --ir DIR|FILE --out DIR [--weights NAME|PATH]
        [--color rgb|ycbcr|gray] [--mode auto|full|tiles|large] [--buckets auto|fine|coarse]
        [--bits 8|16] [--large-passes 1|2] [--recursive] [--keep-going] [--skip-existing]
        [--html FILE]
    python -m dtpf_jax.fuse --weights teacher.msgpack --text "Event Type: Low Light ..." ...
    python -m dtpf_jax.fuse              # built-in demo pair -> ./dtpf_demo/ (index.html)

Folders are paired by basename, ignoring the extension (with --recursive, by the path relative
to each folder); the output keeps the name. Every input is decoded and checked, and the weights,
text, output folder and --html path are ready, before the network runs: bad input stops the run
with one `error:` line (exit 2) and nothing written, unless --keep-going skips the bad pairs
(exit 1). Each output is written atomically, and inputs are never written.
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
from dtpf_jax.images import (
    DataError,
    atomic_write,
    check_output_file,
    read_image,
    to_float,
    to_uint8,
    to_uint16,
    write_png_atomic,
)
from dtpf_jax.plan import (
    Job,
    check_inputs,
    is_done,
    medical_hint,
    plan_jobs,
    prepare_out,
    taken_paths,
    text_embeddings,
)
from dtpf_jax.text import ClipError

DEMO_DIR = "dtpf_demo"


# jax.monitoring events of building a program: tracing, lowering, and compiling it or loading
# it from the persistent cache (the last one fires once per program either way).
_BUILD_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class Stats:
    """What a run did: images, wall time, programs compiled or loaded from the compile cache,
    and the seconds spent building them."""

    images: int = 0
    seconds: float = 0.0
    programs: int = 0
    cached: int = 0
    compile_s: float = 0.0
    tiled: int = 0  # images in the official 128² tiles
    large: int = 0  # images in large tiles

    @property
    def compiles(self) -> int:
        """Programs compiled anew (not loaded from the persistent compile cache)."""
        return self.programs - self.cached

    @property
    def images_per_s(self) -> float:
        """Images per second, compile time left out (nan when every image built a program)."""
        if self.images <= self.programs or self.seconds <= self.compile_s:
            return float("nan")
        return self.images / (self.seconds - self.compile_s)

    def __enter__(self):
        import jax

        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_listener(self._event)
        jax.monitoring.unregister_event_duration_listener(self._duration)

    def _event(self, event: str, **kwargs) -> None:
        self.cached += event == _CACHE_HIT

    def _duration(self, event: str, seconds: float, **kwargs) -> None:
        if event in _BUILD_EVENTS:
            self.compile_s += seconds
            self.programs += event == _BUILD_EVENTS[-1]


def _load(job: Job) -> tuple[np.ndarray, np.ndarray]:
    # 16-bit reads keep a 16-bit infrared's levels; 8-bit files give the same floats either way.
    return to_float(read_image(job.vis, "RGB", 16)), to_float(read_image(job.ir, "L", 16))


def _save(job: Job, fused: np.ndarray, vis: np.ndarray, color: str, bits: int = 8) -> None:
    out = infer.apply_color(fused, vis, color)
    write_png_atomic(job.out, to_uint16(out) if bits == 16 else to_uint8(out))


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
    bits: int = 8,
    large_passes: int = 1,
):
    """Fuse every job and write its PNG (8- or 16-bit) atomically; returns Stats.

    Decoding the next pair and encoding finished PNGs run on threads beside the network
    (PIL releases the GIL): on a GPU they otherwise take longer than the fusion itself.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    t_start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    with Stats() as stats, ThreadPoolExecutor(2) as pool:
        pending, ahead = [], pool.submit(_load, jobs[0]) if jobs else None
        for k, (job, emb) in enumerate(zip(jobs, embs, strict=True)):
            vis, ir = ahead.result()
            if k + 1 < len(jobs):
                ahead = pool.submit(_load, jobs[k + 1])
            job_mode = infer.pick_mode(mode, *job.size, threshold)
            stats.tiled += job_mode == "tiles"
            stats.large += job_mode == "large"
            with TileBar(quiet) as tiles:
                fused = _fuse_one(
                    job, model, vis, ir, emb, job_mode, tile_batch, buckets, tiles, large_passes
                )
            pending.append(pool.submit(_save, job, fused, vis, color, bits))
            while len(pending) > 2:  # bounded: at most 2 finished images wait for their PNG
                pending.pop(0).result()
            stats.images += 1
            stats.seconds = time.perf_counter() - t_start
            bar.update()
            if stats.images > stats.programs:
                bar.set_postfix_str(f"{stats.images_per_s:.2f} images/s after compile")
        for f in pending:
            f.result()
    stats.seconds = time.perf_counter() - t_start
    bar.close()
    return stats


class TileBar:
    """A second bar inside one tiled image: tiles done of total and the time left (shown
    after a second, so quick images do not flicker; the first tile's compile counts)."""

    DELAY_S = 1.0

    def __init__(self, disable: bool):
        self.disable, self.bar = disable, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total,
                unit="tile",
                desc="tiles",
                leave=False,
                delay=self.DELAY_S,
                mininterval=0,
                smoothing=0,  # the time left from the mean rate since the image began
                disable=self.disable,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _fuse_one(
    job: Job,
    model: infer.Model,
    vis,
    ir,
    emb,
    mode: str,
    tiles: int,
    buckets: str,
    progress=None,
    passes: int = 1,
) -> np.ndarray:
    try:
        return model.fuser(
            model.params,
            vis,
            ir,
            emb,
            mode=mode,
            tile_batch=tiles,
            buckets=buckets,
            progress=progress,
            passes=passes,
        )[0]
    except (MemoryError, RuntimeError) as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and not isinstance(e, MemoryError):
            raise
        h, w = job.size
        hint = (
            "--mode tiles (128² tiles: the least memory, slower)"
            if mode == "large"
            else "--mode large or a lower --max-full-pixels"
        )
        raise DataError(f"{job.vis}: out of memory at {w}x{h} in {mode} mode; use {hint}") from None


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
        help="full: whole image at once; tiles: official 128² tiles, Gaussian-blended; "
        "large: a few large tiles with blended seams, bounded memory, close to full; auto "
        "(default): full up to --max-full-pixels, else large",
    )
    p.add_argument(
        "--max-full-pixels",
        type=int,
        default=None,
        metavar="N",
        help="mode auto: large tiles above N pixels (default $DTPF_MAX_FULL_PIXELS or "
        f"{infer.MAX_FULL_PIXELS}; 0 = never)",
    )
    p.add_argument(
        "--large-passes",
        type=int,
        default=1,
        choices=(1, 2),
        metavar="N",
        help="large mode: 1 (default) or 2 runs over the tiles. With 2, every tile runs on "
        "the channel-attention (TSAB) statistics of the whole frame, added up over the tiles "
        "by the first run, instead of its own: about twice the time, closer to a full pass",
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
    p.add_argument(
        "--bits",
        type=int,
        default=8,
        choices=(8, 16),
        help="PNG bit depth of the outputs (default 8). 16-bit gray inputs are always read at "
        "full precision, scaled by their dtype's range (0-65535 -> 0-1), so with --bits 16 a "
        "16-bit thermal image's levels survive into the fused PNG",
    )
    p.add_argument(
        "--recursive",
        action="store_true",
        help="pair the files of the --vis and --ir trees by their path relative to each "
        "(day/0001.png with day/0001.jpg), and mirror the subfolders under --out",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="fuse every good pair and skip the bad ones (unmatched names, undecodable files, "
        "sizes that differ, a teacher's missing caption), one `skipped: NAME: reason` line "
        "each; exit status 1 if any",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep outputs already there and complete (they decode, at the input's size): "
        "an interrupted run continues where it stopped",
    )
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
    """The run behind main(); raises DataError / WeightsError / ClipError on bad input.
    Returns 0, or 1 when --keep-going left pairs out."""
    _compile_cache(args.no_compile_cache)
    out = pathlib.Path(args.out)
    if args.demo:
        prepare_out(out)
        args.vis, args.ir = demo.write_inputs(out)
        out = out / "fused"
        args.html = args.html or str(out.parent / "index.html")
    skipped = [] if args.keep_going else None
    jobs = plan_jobs(args.vis, args.ir, out, args.recursive, skipped)
    if args.html:
        taken = taken_paths(args.vis, args.ir, jobs, args.recursive)
        check_output_file(args.html, "--html", taken)
    jobs = check_inputs(jobs, skipped)
    for name, reason in skipped or ():
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    n_skipped = len(skipped or ())
    _stop_if_all_skipped(jobs, skipped)
    todo = [j for j in jobs if not (args.skip_existing and is_done(j))]
    hint = medical_hint(jobs, args.weights)
    if hint:
        print(hint)
    model = infer.load_model(args.weights, args.dtype)
    done_before = len(jobs) - len(todo)
    todo, embs = text_embeddings(args, model, todo, skipped)
    uncaptioned = (skipped or [])[n_skipped:]  # --keep-going: a teacher's pairs without one
    for name, reason in uncaptioned:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    jobs = [j for j in jobs if j.name not in {name for name, _ in uncaptioned}]
    _stop_if_all_skipped(jobs, skipped)
    prepare_out(out, todo)
    threshold = infer.max_full_pixels() if args.max_full_pixels is None else args.max_full_pixels
    big = [j for j in todo if infer.pick_mode(args.mode, *j.size, threshold) == "large"]
    if big and args.mode == "auto":
        print(
            f"note: {_count(len(big), 'image')} above {threshold} pixels run in "
            f"large mode (overlapping tiles, bounded memory), e.g. {big[0].vis}; "
            "--max-full-pixels N changes the threshold"
        )
    buckets = args.buckets
    if buckets == "auto":
        full = [j.size for j in todo if infer.pick_mode(args.mode, *j.size, threshold) == "full"]
        buckets = infer.choose_buckets(full)
    stats = run(
        todo,
        model,
        embs,
        args.mode,
        args.color,
        threshold,
        args.quiet,
        max(1, args.tile_batch),
        buckets,
        args.bits,
        args.large_passes,
    )
    if args.html:
        _write_page(args, jobs, model)
    if stats.images:
        print(
            f"compile: {_count(stats.compiles, 'new shape')}"
            + (f", {stats.cached} from the compile cache" if stats.cached else "")
            + f" ({buckets} buckets), {stats.compile_s:.1f} s, not counted in images/s"
        )
    # A rate after compile exists only when some image ran on an already built program.
    ips = (
        f", {stats.images_per_s:.2f} images/s after compile"
        if stats.images > stats.programs
        else ""
    )
    tiled = f", {stats.tiled} in 128² tiles" if stats.tiled else ""
    tiled += f", {stats.large} in large tiles" if stats.large else ""
    kept = f", {done_before} done before and kept (--skip-existing)" if done_before else ""
    print(
        f"done: {_count(stats.images, 'image')}{tiled} in {stats.seconds:.1f} s"
        f"{ips or ''}{kept} -> {out.resolve()}"
    )
    if skipped:
        print(f"skipped: {_count(len(skipped), 'pair')} (listed above)", file=sys.stderr)
        return 1
    return 0


def _stop_if_all_skipped(jobs: Sequence[Job], skipped: list | None) -> None:
    if skipped and not jobs:
        raise DataError(f"nothing to fuse: all {len(skipped)} pairs were skipped (listed above)")


def model_label(weights: str, model: infer.Model) -> str:
    """Who fused, in words, without the install's path."""
    if not model.trained:
        return "an untrained student (random init: the shipped weights are missing)"
    name = pathlib.Path(model.source).name
    return f"the shipped student ({name})" if str(weights) in infer.SHIPPED_STUDENTS else name


def _write_page(args, jobs: Sequence[Job], model: infer.Model) -> None:
    """The --html page; for the demo, with max(vis, ir) and the scores, also in the terminal."""
    label = model_label(args.weights, model)
    notes = [] if model.trained else [infer.UNTRAINED_WARNING]
    if args.demo:
        scores = demo.compare(jobs[0])
        intro = demo.describe(label)
        print(f"demo: {intro}\n{demo.score_table(scores)}")
        intro_line = f"{intro[0].upper()}{intro[1:]}."
        page = demo.page_html(jobs, "DTPF demo", [intro_line, demo.SCORES_NOTE, *notes], [scores])
    else:
        page = demo.page_html(jobs, f"DTPF fusion: {label}", notes)
    html_path = pathlib.Path(args.html)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(html_path, page)
    print(f"page: {html_path.resolve()}")


def _count(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'s' * (n != 1)}"


class _LowerFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 on success, 1 when --keep-going skipped pairs, 2 with one `error:`
    line on bad input."""
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
        print(
            "interrupted: outputs written so far are complete; rerun with --skip-existing "
            "to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
