"""A fuse run's work: the pairs of input files, the output (and a teacher's caption) each one
gets, and the checks made on all of them before the network runs (or, with --keep-going, the
pairs left out and why)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Sequence

from PIL import Image

from dtpf_jax import infer
from dtpf_jax.datasets import MED_A, Pair
from dtpf_jax.images import (
    DataError,
    image_files,
    pair_by_name,
    pair_files,
    read_image,
    refuse_shared,
)


@dataclasses.dataclass
class Job:
    """One pair to fuse and where its result goes."""

    name: str
    vis: pathlib.Path
    ir: pathlib.Path
    out: pathlib.Path
    size: tuple[int, int] = (0, 0)  # (H, W), known after check_inputs


def plan_jobs(
    vis: str | os.PathLike,
    ir: str | os.PathLike,
    out: str | os.PathLike,
    recursive: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Job]:
    """Pair the inputs (two files, or two folders by basename; by relative path in their trees
    with `recursive`) and name the outputs (mirroring the subfolders). Names without a partner
    raise DataError, or are appended to `skipped` as (name, reason) when it is a list."""
    v, i, out = pathlib.Path(vis), pathlib.Path(ir), pathlib.Path(out)
    for p, flag in ((v, "--vis"), (i, "--ir")):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder; check {flag}")
    res = out.resolve()
    for folder in {p.resolve() if p.is_dir() else p.resolve().parent for p in (v, i)}:
        if res == folder:
            raise DataError(
                f"{out}: is an input folder; pass another --out (inputs are never written)"
            )
        if recursive and v.is_dir() and res.is_relative_to(folder):
            raise DataError(
                f"{out}: is inside the input folder {folder}; with --recursive its outputs "
                "would be read as inputs next time; pass an --out outside it"
            )
    if v.is_file() and i.is_file():
        pairs = [(v.stem, (v, i))]
    elif v.is_dir() and i.is_dir():
        pairs, missing = pair_files([v, i], ("vis", "ir"), recursive)
        if missing and skipped is None:
            pair_by_name([v, i], ("vis", "ir"), recursive)  # raises, naming the unmatched
        for n, where in missing.items():
            skipped.append((n, "missing in " + ", ".join(where)))
    else:
        raise DataError(f"{v}, {i}: --vis and --ir must both be files or both be folders")
    return [Job(n, a, b, out / f"{n}.png") for n, (a, b) in pairs]


def taken_paths(vis, ir, jobs: Sequence[Job], recursive: bool = False) -> dict:
    """{resolved path: what it is} for every input image and every planned output: the files
    another output (--html) must not replace."""
    taken = {}
    for flag, p in (("--vis", pathlib.Path(vis)), ("--ir", pathlib.Path(ir))):
        files = image_files(p, recursive).values() if p.is_dir() else [p]
        taken.update({f.resolve(): f"an input image ({flag})" for f in files})
    taken.update({j.out.resolve(): f"where the fused image of {j.name} goes" for j in jobs})
    return taken


def check_inputs(jobs: Sequence[Job], skipped: list[tuple[str, str]] | None = None) -> list[Job]:
    """Decode every image and compare sizes; returns the good jobs. A bad pair raises one line
    naming the first problem, or is appended to `skipped` as (name, reason) when it is a list."""
    problems, good = [], []
    for job in jobs:
        try:
            a, b = read_image(job.vis, "RGB"), read_image(job.ir, "L")
            if a.shape[:2] != b.shape:
                raise DataError(
                    f"{job.vis}: size {a.shape[1]}x{a.shape[0]} differs from {job.ir} "
                    f"{b.shape[1]}x{b.shape[0]}; register or resize the pair"
                )
        except DataError as e:
            problems.append(str(e))
            if skipped is not None:
                skipped.append((job.name, str(e)))
            continue
        job.size = b.shape
        good.append(job)
    if problems and skipped is None:
        more = f" (+{len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return good


def is_done(job: Job) -> bool:
    """Whether the job's output exists and is complete: it decodes, at the input's size."""
    try:
        with Image.open(job.out) as img:
            img.load()
            return img.size == (job.size[1], job.size[0])
    except (OSError, SyntaxError, ValueError):
        return False


def prepare_out(out: pathlib.Path, jobs: Sequence[Job] = ()) -> None:
    """Create the output folder (and the jobs' subfolders) if needed and check that files can
    be written there."""
    refuse_shared(out)
    try:
        for folder in sorted({out, *(j.out.parent for j in jobs)}):
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dtpf_probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"{out}: cannot write the output folder ({e.strerror or e}); pass a writable --out"
        ) from None


def text_embeddings(
    args, model: infer.Model, jobs: Sequence[Job], skipped: list | None = None
) -> tuple[list[Job], list]:
    """(jobs, one (1, D) embedding per job) for a teacher (from --text or --captions), else
    Nones. With `skipped` (--keep-going), pairs without a caption file are left out and
    listed there as (name, reason) instead of stopping the run."""
    if not model.text_guided:
        if args.text is not None or args.captions:
            raise DataError(
                f"{model.source}: the student is text-free; drop --text/--captions "
                "(they are for a teacher's weights)"
            )
        return list(jobs), [None] * len(jobs)
    if args.text is not None and args.captions:
        raise DataError("--text and --captions: pass one of them, not both")
    if args.text is None and not args.captions:
        raise DataError(
            f'{model.source}: a teacher needs a caption; pass --text "Event Type: ..." '
            "or --captions DIR (a <name>.txt per pair)"
        )
    if not jobs:  # --skip-existing: every output is there already
        return [], []
    from dtpf_jax import captions, text

    jobs = list(jobs)
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
        if missing and skipped is not None:
            reason = f"no caption file in {args.captions} (write <name>.txt there or use --text)"
            skipped.extend((name, reason) for name in missing)
            gone = set(missing)
            jobs = [j for j in jobs if j.name not in gone]
        elif missing:
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
    return jobs, [emb[s][None] for s in strings]


def medical_hint(jobs: Sequence[Job], weights: str) -> str | None:
    """A note when the default IVF student meets a PET/SPECT/CT folder and its student ships."""
    if str(weights) not in ("student", "student_ivf") or not jobs:
        return None
    folder = jobs[0].vis.parent.name.lower()  # the A folder names of the medical layout
    name = f"student_{folder}_mri"
    if folder not in MED_A or not (infer.WEIGHTS_DIR / infer.SHIPPED_STUDENTS[name]).is_file():
        return None
    return (
        f"note: {jobs[0].vis.parent} looks like medical input and --weights {weights} is the "
        f"infrared-visible student; --weights {name} is the one trained on {folder.upper()}-MRI"
    )
