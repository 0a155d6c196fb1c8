"""A fuse run's work: the pairs of input files, the output each one gets, and the checks made
on all of them before the network runs."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Sequence

from dtpf_jax import infer
from dtpf_jax.datasets import MED_A
from dtpf_jax.images import DataError, pair_by_name, read_image, refuse_shared


@dataclasses.dataclass
class Job:
    """One pair to fuse and where its result goes."""

    name: str
    vis: pathlib.Path
    ir: pathlib.Path
    out: pathlib.Path
    size: tuple[int, int] = (0, 0)  # (H, W), known after check_inputs


def plan_jobs(vis: str, ir: str, out: str | os.PathLike) -> list[Job]:
    """Pair the inputs (two files, or two folders by basename) and name the outputs."""
    v, i, out = pathlib.Path(vis), pathlib.Path(ir), pathlib.Path(out)
    for p, flag in ((v, "--vis"), (i, "--ir")):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder; check {flag}")
    if v.is_file() and i.is_file():
        pairs = [(v.stem, (v, i))]
    elif v.is_dir() and i.is_dir():
        pairs = pair_by_name([v, i], roles=("vis", "ir"))
    else:
        raise DataError(f"{v}, {i}: --vis and --ir must both be files or both be folders")
    res = out.resolve()
    for folder in {p.resolve() if p.is_dir() else p.resolve().parent for p in (v, i)}:
        if res == folder:
            raise DataError(
                f"{out}: is an input folder; pass another --out (inputs are never written)"
            )
    return [Job(n, a, b, out / f"{n}.png") for n, (a, b) in pairs]


def check_inputs(jobs: Sequence[Job]) -> None:
    """Decode every image and compare sizes; raise one line naming the first problem."""
    problems = []
    for job in jobs:
        try:
            a, b = read_image(job.vis, "RGB"), read_image(job.ir, "L")
        except DataError as e:
            problems.append(str(e))
            continue
        if a.shape[:2] != b.shape:
            problems.append(
                f"{job.vis}: size {a.shape[1]}x{a.shape[0]} differs from {job.ir} "
                f"{b.shape[1]}x{b.shape[0]}; register or resize the pair"
            )
        job.size = b.shape
    if problems:
        more = f" (+{len(problems) - 1} more bad inputs)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def prepare_out(out: pathlib.Path) -> None:
    """Create the output folder if needed and check that files can be written there."""
    refuse_shared(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dtpf_probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"{out}: cannot write the output folder ({e.strerror or e}); pass a writable --out"
        ) from None


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
