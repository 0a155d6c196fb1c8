"""Teacher (text-guided, dim 48, ~40.3 M params) on infrared-visible fusion.

  python -m dtpf_jax.train --config configs/teacher.py            # paper defaults
  python -m dtpf_jax.train --config configs/teacher.py:official   # the official code's switches
  python -m dtpf_jax.summary --config configs/teacher.py          # parameter table

Variants after the colon: `official` (FiLM gamma*F+beta), `smoke` (tiny model).
"""

import ml_collections

from dtpf_jax.networks import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "teacher"
    config.stage = "teacher"
    config.model = model_config("teacher")
    variants = set((arg or "").split(",")) - {""}
    if "official" in variants:
        config.model.film_form = "official"
    if "smoke" in variants:
        config.model.dim = 8
        config.model.num_blocks = (1, 1, 1, 1)
        config.model.num_refinement_blocks = 1
    unknown = variants - {"official", "smoke"}
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; use official, smoke")
    return config
