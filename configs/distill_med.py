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

import pathlib

import ml_collections

from dtpf_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, task, rest = config_lib.medical_config(
        pathlib.Path(__file__).with_name("distill.py"), arg
    )
    config.teacher_workdir = "runs/" + "_".join(["teacher_med", task, *rest])
    return config
