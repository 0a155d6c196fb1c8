"""Student (text-free, dim 16, ~4.37 M params) distilled from the frozen teacher.

  python -m dtpf_jax.train --config configs/distill.py            # paper defaults
  python -m dtpf_jax.train --config configs/distill.py:official   # the official code's switches
  python -m dtpf_jax.summary --config configs/distill.py          # parameter table (student)

Variants after the colon: `official`, `smoke` (tiny student and teacher).
"""

import ml_collections

from dtpf_jax.networks import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "distill"
    config.stage = "distill"
    config.model = model_config("student")
    config.teacher_model = model_config("teacher")
    variants = set((arg or "").split(",")) - {""}
    if "official" in variants:
        config.teacher_model.film_form = "official"
    if "smoke" in variants:
        for m in (config.model, config.teacher_model):
            m.dim = 8
            m.num_blocks = (1, 1, 1, 1)
            m.num_refinement_blocks = 1
    unknown = variants - {"official", "smoke"}
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; use official, smoke")
    return config
