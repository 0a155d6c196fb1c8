"""Test environment: CPU only, 4 fake devices, offline hub, persistent compilation cache.

Everything here runs before jax is imported by any test module.
"""

import os
import pathlib
from importlib import metadata

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
# Tests build programs unoptimised (LLVM -O0) with XLA:CPU's classic fusion emitters: values
# within ~3e-7 of the default build, and a third less CPU for the whole suite (1507 -> 1038 s;
# a micro training step compiles in 4 s instead of 15). Subprocesses started by tests inherit
# these flags. The package itself keeps XLA's defaults (faster programs, slower compiles).
# jaxlib 0.11 dropped the classic emitters and their flag, which XLA would refuse as unknown,
# killing the process (pip gives Python 3.12 and later jax 0.12): there, -O0 alone.
# FAST_COMPILE: the same as compile options, for programs that tests build explicitly.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
if tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    FAST_COMPILE["xla_cpu_use_fusion_emitters"] = False
for _name, _value in FAST_COMPILE.items():
    if _name not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += f" --{_name}={str(_value).lower()}"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
_cache = os.environ.get("DTPF_JAX_CACHE", str(REPO / ".cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# grain workers and absl-based mains read flags; tests never parse argv.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data when present; the test is skipped otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not available")
    return SHARED


def tiny_model_config(kind: str = "student"):
    """The smallest model of the official shape: dim 8, one block per level."""
    from dtpf_jax.networks import model_config

    cfg = model_config(kind)
    cfg.dim = 8
    cfg.num_blocks = (1, 1, 1, 1)
    cfg.num_refinement_blocks = 1
    return cfg


@pytest.fixture(scope="session")
def tiny_student():
    """(config, params) of a tiny student, drawn once per session with numpy in PyTorch's
    default init (`infer.random_params`: no compile, where jitted init takes ~50 s of CPU)."""
    from dtpf_jax import infer

    cfg = tiny_model_config("student")
    return cfg, infer.random_params(cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher():
    from dtpf_jax import infer

    cfg = tiny_model_config("teacher")
    return cfg, infer.random_params(cfg, seed=1)


# The costliest files first (their CPU seconds in a clean run, 2026-12-04): with `--dist
# loadfile --no-loadscope-reorder` (pyproject) the two workers take files in this order as
# they come free, so no long file starts last and leaves the other worker idle.
HEAVY_FIRST = (
    "test_train.py",  # 300: the 4-device step programs, four training CLIs
    "test_fuse.py",  # 105
    "test_device_train.py",  # 70: the GPU command in its smoke form
    "test_multihost.py",  # 70: two training processes
    "test_finetune_head.py",  # 65
    "test_networks.py",  # 60
    "test_infer.py",  # 50
    "test_convert.py",  # 40
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as collected
