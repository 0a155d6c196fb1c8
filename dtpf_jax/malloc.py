"""glibc malloc settings for the command-line tools (Linux only; no effect elsewhere).

XLA:CPU allocates fresh work buffers on every call. Under glibc's defaults, large buffers are
mapped and unmapped each time and every first touch of a page faults: about 30,000 page faults
per student forward at 128x128 and 430,000 at 512x640. `TUNED` keeps freed memory in the heap
(no mmap, no trimming) and asks for transparent huge pages, which removes nearly all of them.
On the 2-core project CPU (A/B pairs of fresh processes) the student forward at 128x128 was
1-18 % faster (six pairs, median 12 %), at 512x640 1-3 %, and the student's training step
(batch 4, 128x128) 7.5 -> 5.1 s. DESIGN §11's setting also had `arena_max=1`: with XLA's
thread pool sharing one arena it was slower here (279-296 ms against 262-285 ms at 128x128),
so it is left out.

glibc reads GLIBC_TUNABLES only at process start, so `python -m dtpf_jax.fuse` (and
`.evaluate`, `.train`) re-execute themselves once with it set, from the package's
`__init__`, before jax is imported. A GLIBC_TUNABLES already in the environment is left as it
is; DTPF_MALLOC=default turns the re-execution off. Importing the package as a library never
re-executes anything.
"""

from __future__ import annotations

import os
import platform
import sys

TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
# `python -m <module>` command lines that re-execute under TUNED.
CLI_MODULES = ("dtpf_jax.fuse", "dtpf_jax.evaluate", "dtpf_jax.train")


def cli_module(argv: list[str]) -> str | None:
    """The dtpf_jax CLI module that `argv` (a full interpreter command line) runs, if any."""
    i = 1
    while i < len(argv) - 1:
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if argv[i + 1] in CLI_MODULES else None
        if not arg.startswith("-") or arg == "-c":
            return None  # a script path or `-c`: not one of ours
        i += 2 if arg in ("-X", "-W") else 1  # options that take a value
    return None


def wants_reexec(argv: list[str], environ: dict, system: str, libc: str) -> bool:
    """Whether this process should re-run itself under TUNED."""
    return (
        system == "Linux"
        and libc == "glibc"
        and "GLIBC_TUNABLES" not in environ
        and environ.get("DTPF_MALLOC", "tuned") == "tuned"
        and cli_module(argv) is not None
    )


def reexec_tuned(argv: list[str]) -> None:
    """Replace this process by `argv` run under TUNED; returns only if that is impossible."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, dict(os.environ, GLIBC_TUNABLES=TUNED))
    except OSError:
        pass  # could not re-execute: run on with glibc's defaults


def reexec_if_cli() -> None:
    """Re-run a `python -m dtpf_jax.<cli>` command line under TUNED (once; see module doc)."""
    argv = list(getattr(sys, "orig_argv", []))
    if wants_reexec(argv, os.environ, platform.system(), platform.libc_ver()[0]):
        reexec_tuned(argv)
