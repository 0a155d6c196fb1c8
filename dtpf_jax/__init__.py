"""dtpf_jax: JAX/Flax reimplementation of DTPF (text-prior distillation for image fusion)."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised scheduler keeps far more activations alive in the backward
# pass (student grad at batch 4, 128^2: 13 GiB instead of 4.4 GiB; the teacher does not fit in
# 24 GiB). Must be in XLA_FLAGS before jax starts its CPU backend; a user's setting wins.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()

# `python -m dtpf_jax.fuse` / `.evaluate` / `.train`: re-run once under glibc malloc settings
# that spare XLA:CPU's per-call page faults (see dtpf_jax/malloc.py); a no-op on import.
from dtpf_jax import malloc as _malloc  # noqa: E402

_malloc.reexec_if_cli()

__all__ = ["fuse_images", "load_model"]


def __getattr__(name: str):
    # Lazy: `import dtpf_jax` must not pull in jax; the API loads on first use.
    if name in __all__:
        from dtpf_jax import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'dtpf_jax' has no attribute {name!r}")
