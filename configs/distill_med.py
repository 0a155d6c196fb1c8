"""Student distilled on medical fusion (Harvard) from the teacher of configs/teacher_med.py.

  python -m dtpf_jax.train --config configs/distill_med.py                 # PET-MRI
  python -m dtpf_jax.train --config configs/distill_med.py:spect_mri       # SPECT-MRI
  python -m dtpf_jax.train --config configs/distill_med.py:ct_mri,official
  python -m dtpf_jax.train --config configs/distill_med.py:spect_mri,smoke # tiny, CI
  python -m dtpf_jax.export runs/distill_med_pet_mri student_pet_mri.msgpack

Every field is that of configs/distill.py (documented there); this file changes the data (the
task's Harvard train split, last 5 % for validation, medical task-weight table, whose
`default` row weights the student's base loss), the name (runs/distill_med_<task>[...]), the
teacher it reads (runs/teacher_med_<task>[_official][_smoke]) and the length (1000 epochs,
T_max 1000, as the official medical run). Variants: the task (`pet_mri`, default;
`spect_mri`; `ct_mri`), `official`, `smoke`.
Expected time: 15k steps at global batch 16 on GPUs.
Expected result: validation quality (clean convention) rising towards the teacher's.
"""

import importlib.util
import pathlib

import ml_collections

from dtpf_jax.data import default_config as data_config

TASKS = ("pet_mri", "spect_mri", "ct_mri")


def _ivf_get_config(arg: str):
    """get_config of the sibling IVF file (config files are loaded by path, not as a package)."""
    path = pathlib.Path(__file__).with_name("distill.py")
    spec = importlib.util.spec_from_file_location("_distill_ivf_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = set((arg or "").split(",")) - {""}
    tasks = variants & set(TASKS)
    if len(tasks) > 1:
        raise ValueError(f"one task per run, got {sorted(tasks)}")
    task = tasks.pop() if tasks else TASKS[0]
    rest = sorted(variants - set(TASKS))
    config = _ivf_get_config(",".join(rest))
    config.name = "_".join(["distill_med", task, *rest])
    config.teacher_workdir = "runs/" + "_".join(["teacher_med", task, *rest])
    smoke_crop = config.data.crop
    config.data = data_config("medical")
    config.data.train = (f"harvard/{task}/train",)
    config.data.val = config.data.train
    config.data.test = (f"harvard/{task}/test",)
    config.data.read_threads = 8
    config.steps = 15_000
    config.eval_every = 500
    config.official_t_max = 1000
    if "smoke" in rest:
        config.data.val_split = (0.99, 1.0)
        config.data.crop = smoke_crop
        config.data.read_threads, config.data.prefetch = 2, 2
        config.steps = 4
        config.eval_every = 4
    return config
