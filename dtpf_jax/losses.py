"""Fusion losses (official terms), task-weight tables, distillation losses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Order of the per-sample weight vector that the data pipeline yields and the loss consumes.
# ir_compose (the IR weight inside the consistency term) is 1 in every official table.
WEIGHT_KEYS = ("max", "consist", "grad", "ssim", "color")

# configs/Train_text_xrestormer.yaml (IVF); DESIGN §4.2. "grad" is the official `text_ratio`.
IVF_TASK_WEIGHTS: Mapping[str, tuple[float, ...]] = {
    "low_light": (48, 20, 48, 2, 12),
    "over_exposure": (32, 60, 48, 2, 12),
    "ir_low_contrast": (40, 40, 48, 2, 12),
    "ir_noise": (32, 60, 48, 2, 12),
    "motion_blur": (32, 40, 72, 2, 12),
    "sensor_artifact": (24, 80, 96, 2, 12),
    "high_noise": (32, 80, 72, 2, 12),
    "default": (24, 40, 48, 2, 12),
}

# configs/Train_text_xrestormer_Med.yaml; colour is 12 everywhere (keys absent), and the two
# entries that set the unread `grad_ratio` key keep ssim 2.
MED_TASK_WEIGHTS: Mapping[str, tuple[float, ...]] = {
    "contrast_enhancement": (40, 60, 96, 4, 12),
    "edge_preservation": (48, 80, 72, 2, 12),
    "noise_suppression": (32, 100, 72, 4, 12),
    "detail_enhancement": (40, 80, 96, 2, 12),
    "structure_consistency": (48, 100, 72, 8, 12),
    "artifact_reduction": (32, 120, 96, 6, 12),
    "default": (40, 80, 72, 4, 12),
}

TASK_TABLES = {"ivf": IVF_TASK_WEIGHTS, "medical": MED_TASK_WEIGHTS}


def task_weights(events: Iterable[str], table: Mapping[str, tuple[float, ...]]) -> np.ndarray:
    """Mean of the weight rows of a sample's events (unknown or no events -> 'default').

    The official loss averages L over a sample's events; L is linear in the weights, so this
    equals averaging the weights first.
    """
    rows = [table.get(e, table["default"]) for e in events] or [table["default"]]
    return np.mean(np.asarray(rows, np.float32), axis=0)
