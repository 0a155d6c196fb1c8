"""Fusion losses (official terms), task-weight tables, distillation losses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dtpf_jax.color import cb_cr, rgb_to_gray

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


def default_weights(table: str | Mapping[str, tuple[float, ...]]) -> np.ndarray:
    """The `default` row of a table (or of TASK_TABLES[name]) as a (5,) float32 array."""
    if isinstance(table, str):
        table = TASK_TABLES[table]
    return np.asarray(table["default"], np.float32)


# Fusion terms (DESIGN §4.1). Inputs are NHWC in [0, 1]: vis/fused (B,H,W,3), ir (B,H,W,1).

SSIM_WINDOW = 48
SSIM_SIGMA = 1.5


def _gaussian_window(size: int) -> np.ndarray:
    """Official 1-D window: centre at size // 2, made in float32 then normalised."""
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2)).astype(np.float32)
    return g / g.sum()


def _band_matrix(n: int, size: int) -> np.ndarray:
    """(n - size + 1, n) matrix whose rows are the shifted window: a 'valid' 1-D correlation."""
    g = _gaussian_window(size)
    m = np.zeros((n - size + 1, n), np.float32)
    for i in range(n - size + 1):
        m[i, i : i + size] = g
    return m


def gaussian_filter(x: jax.Array, size: int = SSIM_WINDOW) -> jax.Array:
    """'Valid' per-channel Gaussian filter: (B,H,W,C) -> (B,H-size+1,W-size+1,C).

    The 2-D window is the outer product of the 1-D one, so two 1-D passes equal the official
    grouped 2-D conv; as banded matmuls they run far faster than a depthwise conv on CPU.
    """
    mh = jnp.asarray(_band_matrix(x.shape[1], size))
    mw = jnp.asarray(_band_matrix(x.shape[2], size))
    # HIGHEST keeps float32 matmuls exact on GPUs whose default is TF32.
    hp = lax.Precision.HIGHEST
    x = jnp.einsum("ih,bhwc->biwc", mh, x, precision=hp)
    return jnp.einsum("jw,biwc->bijc", mw, x, precision=hp)


def ssim(img1: jax.Array, img2: jax.Array) -> jax.Array:
    """Per-sample SSIM (B,): official window, constants and dynamic range, mean over map and C."""
    size = min(SSIM_WINDOW, img1.shape[1], img1.shape[2])  # as the official code shrinks it
    # L = max_val - min_val, read from img1 of each sample alone (the official runs per sample).
    max_val = jnp.where(jnp.max(img1, axis=(1, 2, 3)) > 128, 255.0, 1.0)
    min_val = jnp.where(jnp.min(img1, axis=(1, 2, 3)) < -0.5, -1.0, 0.0)
    dyn = (max_val - min_val)[:, None, None, None]
    c1, c2 = (0.01 * dyn) ** 2, (0.03 * dyn) ** 2
    stats = gaussian_filter(jnp.concatenate([img1, img2, img1**2, img2**2, img1 * img2], -1), size)
    mu1, mu2, e11, e22, e12 = jnp.split(stats, 5, axis=-1)
    s11, s22, s12 = e11 - mu1**2, e22 - mu2**2, e12 - mu1 * mu2
    num = (2 * mu1 * mu2 + c1) * (2 * s12 + c2)
    den = (mu1**2 + mu2**2 + c1) * (s11 + s22 + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def sobel_abs(gray: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|Sx|, |Sy| of unnormalised 3×3 Sobel kernels with replicate padding, same size."""
    p = jnp.pad(gray, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = gray.shape[1], gray.shape[2]
    s = lambda i, j: p[:, i : i + h, j : j + w]
    gx = (s(0, 2) + 2 * s(1, 2) + s(2, 2)) - (s(0, 0) + 2 * s(1, 0) + s(2, 0))
    gy = (s(2, 0) + 2 * s(2, 1) + s(2, 2)) - (s(0, 0) + 2 * s(0, 1) + s(0, 2))
    return jnp.abs(gx), jnp.abs(gy)


def _mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2, 3))


def intensity_target(vis: jax.Array, ir: jax.Array) -> jax.Array:
    """The max term's target: IR (broadcast over RGB) where its channel mean is higher, else vis."""
    mask = jnp.mean(ir, -1, keepdims=True) > jnp.mean(vis, -1, keepdims=True)
    return jnp.where(mask, ir, vis)


def fusion_terms(fused: jax.Array, vis: jax.Array, ir: jax.Array) -> jax.Array:
    """Unweighted official terms per sample, (B, 5) in WEIGHT_KEYS order."""
    fused, vis, ir = (a.astype(jnp.float32) for a in (fused, vis, ir))
    gray_f, gray_v, gray_i = rgb_to_gray(fused), rgb_to_gray(vis), rgb_to_gray(ir)
    l_max = _mean(jnp.abs(fused - intensity_target(vis, ir)))
    l_consist = 0.5 * (_mean(jnp.abs(gray_v - gray_f)) + _mean(jnp.abs(gray_i - gray_f)))
    fx, fy = sobel_abs(gray_f)
    vx, vy = sobel_abs(gray_v)
    ix, iy = sobel_abs(gray_i)
    l_grad = _mean(jnp.abs(fx - jnp.maximum(vx, ix))) + _mean(jnp.abs(fy - jnp.maximum(vy, iy)))
    l_ssim = (1 - ssim(vis, fused)) + (1 - ssim(gray_i, gray_f))
    # Cb and Cr are two separate means in the official code: sum over the 2 channels.
    l_color = jnp.sum(jnp.mean(jnp.abs(cb_cr(vis) - cb_cr(fused)), axis=(1, 2)), axis=-1)
    return jnp.stack([l_max, l_consist, l_grad, l_ssim, l_color], axis=-1)


def fusion_loss(
    fused: jax.Array, vis: jax.Array, ir: jax.Array, weights: jax.Array, intensity_l2: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b Σ_k weights[b,k]·term[b,k]; weights (B,5) or (5,); metrics: weighted term means.

    intensity_l2 > 0 adds intensity_l2 · mean((fused - intensity_target)²), metric
    'intensity_l2': not an official term. The official L1 terms pull with a constant-size
    gradient whatever the error, and from a student that outputs the visible image they barely
    bring the infrared in (docs/experiments.md, "The intensity-term study"); the squared error
    pulls in proportion to the missing infrared. Off by default.
    """
    terms = fusion_terms(fused, vis, ir)
    weighted = terms * jnp.broadcast_to(jnp.asarray(weights, jnp.float32), terms.shape)
    per_term = jnp.mean(weighted, axis=0)
    metrics = {k: per_term[i] for i, k in enumerate(WEIGHT_KEYS)}
    total = jnp.sum(per_term)
    if intensity_l2:
        target = intensity_target(vis.astype(jnp.float32), ir.astype(jnp.float32))
        metrics["intensity_l2"] = intensity_l2 * jnp.mean((fused.astype(jnp.float32) - target) ** 2)
        total = total + metrics["intensity_l2"]
    return total, metrics


# Distillation (DESIGN §4.3, decision 2).

DISTILL_FORMS = ("paper", "official")


def adapters_trainable(form: str) -> bool:
    """Paper: the Down adapters learn with the student; official: frozen random projections."""
    if form not in DISTILL_FORMS:
        raise ValueError(f"distill form {form!r} is not one of {DISTILL_FORMS}")
    return form == "paper"


def _torch_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class FeatureAdapters(nn.Module):
    """1×1 convs with bias from each teacher decoder feature to the student's width.

    Initialised as PyTorch's default Conv2d: kernel and bias U(±1/sqrt(fan_in)).
    """

    widths: Sequence[int]

    @nn.compact
    def __call__(self, teacher_feats: Sequence[jax.Array]) -> list[jax.Array]:
        if len(teacher_feats) != len(self.widths):
            raise ValueError(f"{len(teacher_feats)} teacher features for {len(self.widths)} widths")
        return [
            nn.Conv(
                w,
                (1, 1),
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_bias_init(f.shape[-1]),
                name=f"adapter_{i}",
            )(f)
            for i, (w, f) in enumerate(zip(self.widths, teacher_feats, strict=True))
        ]


def init_adapters(
    rng: jax.Array, student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array]
) -> dict:
    """Adapter params; widths come from the features' last dims (arrays or ShapeDtypeStructs)."""
    widths = tuple(f.shape[-1] for f in student_feats)
    dummies = [jnp.zeros((1, 1, 1, f.shape[-1]), jnp.float32) for f in teacher_feats]
    return FeatureAdapters(widths).init(rng, dummies)["params"]


def _l2_normalise(x: jax.Array) -> jax.Array:
    # max(||x||, 1e-12) as torch's F.normalize, written on the squared norm so grads stay finite.
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x**2, -1, keepdims=True), 1e-24))


def _smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    d = jnp.abs(a - b)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d**2, d - 0.5))


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(a - b))


def distill_loss(
    student_out: jax.Array,
    student_feats: Sequence[jax.Array],
    teacher_out: jax.Array,
    teacher_feats: Sequence[jax.Array],
    adapter_params: dict,
    vis: jax.Array,
    ir: jax.Array,
    *,
    table_default_weights: jax.Array,
    form: str = "paper",
    feature_weight: float = 0.1,
    result_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """base_student + feature_weight·L_feat + result_weight·L_res, and metrics.

    Features are [dec4, dec3, dec2, dec1]. 'paper': L1 on raw features and outputs;
    'official': SmoothL1(β=1) on channel-L2-normalised features and on outputs, adapters frozen.
    """
    official = not adapters_trainable(form)
    teacher_out, teacher_feats = lax.stop_gradient((teacher_out, tuple(teacher_feats)))
    if official:
        # Zero grads here; the train step must also keep them out of the optimizer (weight decay).
        adapter_params = lax.stop_gradient(adapter_params)
    w = jnp.asarray(table_default_weights, jnp.float32)
    base_student, student_terms = fusion_loss(student_out, vis, ir, w)
    base_parent, _ = fusion_loss(teacher_out, vis, ir, w)  # logged only, as the official
    widths = tuple(f.shape[-1] for f in student_feats)
    adapted = FeatureAdapters(widths).apply({"params": adapter_params}, teacher_feats)
    if official:
        feat_levels = [
            _smooth_l1(_l2_normalise(s), _l2_normalise(t))
            for s, t in zip(student_feats, adapted, strict=True)
        ]
        l_res = _smooth_l1(student_out, teacher_out)
    else:
        feat_levels = [_l1(s, t) for s, t in zip(student_feats, adapted, strict=True)]
        l_res = _l1(student_out, teacher_out)
    l_feat = sum(feat_levels)
    total = base_student + feature_weight * l_feat + result_weight * l_res
    metrics = {
        "total": total,
        "base_student": base_student,
        "base_parent": base_parent,
        "feat": l_feat,
        "res": l_res,
        # Levels arrive as [dec4, ..., dec1].
        **{f"feat_dec{len(feat_levels) - i}": v for i, v in enumerate(feat_levels)},
        **{f"student_{k}": v for k, v in student_terms.items()},
    }
    return total, metrics
