"""Teacher on medical fusion (Harvard): modality A (PET/SPECT/CT) RGB + MRI, one task per run.

  python -m dtpf_jax.train --config configs/teacher_med.py                 # PET-MRI
  python -m dtpf_jax.train --config configs/teacher_med.py:spect_mri       # SPECT-MRI
  python -m dtpf_jax.train --config configs/teacher_med.py:ct_mri,official
  python -m dtpf_jax.train --config configs/teacher_med.py:spect_mri,smoke # tiny, CI

Every field is that of configs/teacher.py (documented there); this file changes the data (the
task's Harvard train split, last 5 % for validation, medical task-weight table), the name
(runs/teacher_med_<task>[_official][_smoke]) and the length: the official medical run has 1000
teacher epochs with T_max 1000. Variants after the colon, combinable: the task (`pet_mri`,
default; `spect_mri`; `ct_mri`), `official`, `smoke` (as in configs/teacher.py, on a few pairs).
Expected time: 15k steps at global batch 16 on GPUs (~1000 epochs of ~230 pairs).
Expected result: validation quality (clean convention) rising over the run.
"""

import pathlib

import ml_collections

from dtpf_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config, _, _ = config_lib.medical_config(pathlib.Path(__file__).with_name("teacher.py"), arg)
    return config
