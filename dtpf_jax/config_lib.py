"""What the training config files share: variants, the `:smoke` settings, the medical form.

Config files are loaded by path (`--config configs/teacher.py:variants`), not imported as a
package, so their common parts live here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterable

import ml_collections

from dtpf_jax.datasets import default_config as data_config

MED_TASKS = ("pet_mri", "spect_mri", "ct_mri")


def parse_variants(arg: str | None, known: Iterable[str]) -> set[str]:
    """The comma-separated variants after the colon; unknown ones are an error."""
    variants = set((arg or "").split(",")) - {""}
    unknown = variants - set(known)
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; use {sorted(known)}")
    return variants


def apply_smoke(config: ml_collections.ConfigDict, models: Iterable[ml_collections.ConfigDict]):
    """`:smoke`: tiny models, 64² crops of msrs_128, 2 validation pairs, 4 steps (CI)."""
    for m in models:
        m.dim = 8
        m.num_blocks = (1, 1, 1, 1)
        m.num_refinement_blocks = 1
    config.data.train = ("msrs_128/train",)
    config.data.val = config.data.train
    config.data.val_split = (0.996, 1.0)  # 2 pairs
    config.data.crop = 64
    config.data.read_threads, config.data.prefetch = 2, 2
    config.batch_size = 4
    config.steps = 4
    config.eval_every = 4
    config.checkpoint_every = 2
    config.log_every = 1


def load_config_file(path: str | pathlib.Path, arg: str) -> ml_collections.ConfigDict:
    """get_config(arg) of the config file at `path`."""
    spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def medical_config(
    ivf_file: str | pathlib.Path, arg: str | None
) -> tuple[ml_collections.ConfigDict, str, list[str]]:
    """The IVF config of `ivf_file` turned medical: (config, task, the other variants).

    One Harvard task per run (`pet_mri` by default), its train split with the last 5 % for
    validation, the medical task-weight table, name `<stem>_med_<task>[_variants]`, and the
    official medical length (1000 epochs, T_max 1000).
    """
    variants = set((arg or "").split(",")) - {""}
    tasks = variants & set(MED_TASKS)
    if len(tasks) > 1:
        raise ValueError(f"one task per run, got {sorted(tasks)}")
    task = tasks.pop() if tasks else MED_TASKS[0]
    rest = sorted(variants - set(MED_TASKS))
    config = load_config_file(ivf_file, ",".join(rest))
    config.name = "_".join([f"{pathlib.Path(ivf_file).stem}_med", task, *rest])
    smoke_crop = config.data.crop
    config.data = data_config("medical")
    config.data.train = (f"harvard/{task}/train",)
    config.data.val = config.data.train  # last 5 %: 13 (PET), 17 (SPECT), 8 (CT) pairs
    config.data.test = (f"harvard/{task}/test",)
    config.data.read_threads = 8
    config.steps = 15_000
    config.eval_every = 500
    config.official_t_max = 1000  # the medical YAML's T_max
    if "smoke" in rest:
        config.data.val_split = (0.99, 1.0)  # 2 to 4 pairs
        config.data.crop = smoke_crop
        config.data.read_threads, config.data.prefetch = 2, 2
        config.steps = 4
        config.eval_every = 4
    return config, task, rest
