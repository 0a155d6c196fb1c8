"""Per-module parameter table of a config's model, computed with jax.eval_shape.

python -m dtpf_jax.summary --config configs/teacher.py
"""

from __future__ import annotations

import re

import jax
import numpy as np
from absl import app
from flax.traverse_util import flatten_dict
from ml_collections import config_flags

from dtpf_jax import networks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (model settings).")


_STAGES = ("encoder_level", "decoder_level", "refinement")


def param_table(model_cfg, depth: int = 1) -> tuple[list[tuple[str, int]], int]:
    """[(module path, params)] grouped at `depth` levels, and the total; compiles nothing."""
    model = networks.build_model(model_cfg)
    shapes = jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0)))
    groups: dict[str, int] = {}
    for path, leaf in flatten_dict(shapes).items():
        # Blocks of one stage (decoder_level1_0, decoder_level1_1, ...) share a row.
        key = "/".join(
            re.sub(r"_(\d+)$", "", p) if p.startswith(_STAGES) else p for p in path[:depth]
        )
        groups[key] = groups.get(key, 0) + int(np.prod(leaf.shape))
    return list(groups.items()), sum(groups.values())


def main(argv):
    del argv
    cfg = _CONFIG.value
    rows, total = param_table(cfg.model, depth=1)
    width = max(len(k) for k, _ in rows)
    print(f"{'module':<{width}}  {'params':>12}  {'share':>6}")
    for name, n in rows:
        print(f"{name:<{width}}  {n:>12,}  {100 * n / total:>5.1f}%")
    print(f"total: {total} params")


if __name__ == "__main__":
    app.run(main)
