"""Fusion and distillation losses against numpy references on small known inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dtpf_jax import losses

# One jitted function per API and few distinct shapes: compile time dominates on CPU.
_terms = jax.jit(losses.fusion_terms)
_loss = jax.jit(losses.fusion_loss)
_ssim = jax.jit(losses.ssim)
_distill = jax.jit(losses.distill_loss, static_argnames=("form",))

B, H, W = 2, 64, 64
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
TEACHER_WIDTHS, STUDENT_WIDTHS, SIDES = (384, 192, 96, 96), (128, 64, 32, 32), (4, 8, 16, 16)


def _images(seed=0, b=B):
    r = np.random.default_rng(seed)
    vis = r.uniform(0, 1, (b, H, W, 3)).astype(np.float32)
    ir = r.uniform(0, 1, (b, H, W, 1)).astype(np.float32)
    fused = np.clip(0.5 * vis + 0.5 * ir + r.normal(0, 0.1, vis.shape), 0, 1).astype(np.float32)
    return fused, vis, ir


FUSED, VIS, IR = _images()


def _gray(x):
    x = np.asarray(x, np.float64)
    return x if x.shape[-1] == 1 else x @ np.array([0.299, 0.587, 0.114])[:, None]


def _ssim_ref(a, b):
    """Direct 2-D Gaussian-window SSIM of one (H,W,C) sample, float64, official constants."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(48, a.shape[0], a.shape[1])
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / g.sum() ** 2
    dyn = (255.0 if a.max() > 128 else 1.0) - (-1.0 if a.min() < -0.5 else 0.0)
    c1, c2 = (0.01 * dyn) ** 2, (0.03 * dyn) ** 2
    vals = []
    for c in range(a.shape[-1]):
        f = lambda x: np.einsum("ijkl,kl->ij", sliding_window_view(x, (size, size)), win)
        x, y = a[..., c], b[..., c]
        mu1, mu2 = f(x), f(y)
        s11, s22, s12 = f(x * x) - mu1**2, f(y * y) - mu2**2, f(x * y) - mu1 * mu2
        m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
        vals.append(m)
    return np.mean(vals)


def _sobel_ref(g):
    """|Sx|, |Sy| of one (H,W) image by looping over the 3×3 taps of the replicate-padded image."""
    p = np.pad(g, 1, mode="edge")
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    for i in range(3):
        for j in range(3):
            patch = p[i : i + g.shape[0], j : j + g.shape[1]]
            gx += SOBEL_X[i, j] * patch
            gy += SOBEL_X.T[i, j] * patch
    return np.abs(gx), np.abs(gy)


def _cbcr(x):
    x = np.asarray(x, np.float64)
    cb = x @ np.array([-0.168736, -0.331264, 0.5])
    cr = x @ np.array([0.5, -0.418688, -0.081312])
    return cb, cr


def test_ssim_map_is_81_square_for_128_crops():
    x = jax.ShapeDtypeStruct((1, 128, 128, 1), jnp.float32)
    assert jax.eval_shape(losses.gaussian_filter, x).shape == (1, 81, 81, 1)


@pytest.mark.parametrize("scale", ["unit", "ranges"])
def test_separable_ssim_equals_direct_2d_window(scale):
    a, b = VIS.copy(), FUSED.copy()
    if scale == "ranges":  # sample 0 in [0,255] (L=255), sample 1 in [-1,1] (L=2): per-sample L
        a[0], b[0] = a[0] * 255, b[0] * 255
        a[1], b[1] = a[1] * 2 - 1, b[1] * 2 - 1
    got = np.asarray(_ssim(a, b))
    want = [_ssim_ref(a[i], b[i]) for i in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ssim_window_shrinks_below_48_pixels():
    r = np.random.default_rng(1)
    a, b = r.uniform(0, 1, (2, 1, 32, 40, 1)).astype(np.float32)
    assert jax.eval_shape(losses.ssim, a, b).shape == (1,)
    np.testing.assert_allclose(losses.ssim(a, b), [_ssim_ref(a[0], b[0])], rtol=1e-5)


def test_identical_images_give_zero_terms_and_finite_grads():
    ir = IR
    vis = np.repeat(ir, 3, axis=-1)  # gray(vis) == ir, CbCr == 0, mask never picks IR
    np.testing.assert_allclose(_ssim(vis, vis), 1.0, atol=1e-6)
    np.testing.assert_allclose(_terms(vis, vis, ir), 0.0, atol=1e-5)
    grad = jax.jit(jax.grad(lambda f, w: losses.fusion_loss(f, vis, ir, w)[0]))
    assert np.isfinite(np.asarray(grad(vis, losses.default_weights("ivf")))).all()


def test_max_term_uses_channel_mean_mask():
    mask = IR.mean(-1, keepdims=True) > VIS.mean(-1, keepdims=True)
    assert 0.2 < mask.mean() < 0.8  # both branches exercised
    target = np.where(mask, np.broadcast_to(IR, VIS.shape), VIS).astype(np.float64)
    want = np.abs(FUSED - target).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(_terms(FUSED, VIS, IR)[:, 0], want, rtol=1e-5)


def test_intensity_l2_is_off_by_default_and_adds_a_squared_error_to_the_max_target():
    w = losses.default_weights("ivf")
    base, base_terms = losses.fusion_loss(FUSED, VIS, IR, w)
    off, off_terms = losses.fusion_loss(FUSED, VIS, IR, w, 0.0)
    assert set(off_terms) == set(losses.WEIGHT_KEYS) and float(off) == float(base)
    mask = IR.mean(-1, keepdims=True) > VIS.mean(-1, keepdims=True)
    target = np.where(mask, np.broadcast_to(IR, VIS.shape), VIS).astype(np.float64)
    want = 25.0 * np.mean((FUSED - target) ** 2)
    total, terms = losses.fusion_loss(FUSED, VIS, IR, w, 25.0)
    np.testing.assert_allclose(float(terms["intensity_l2"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(base) + want, rtol=1e-5)
    # Its gradient grows with the error (the L1 max term's does not): 2·w·(F − target)/N.
    g = jax.grad(lambda f: losses.fusion_loss(f, VIS, IR, w, 25.0)[1]["intensity_l2"])(FUSED)
    np.testing.assert_allclose(np.asarray(g), 50.0 * (FUSED - target) / FUSED.size, atol=1e-7)


def test_consist_term():
    gf = _gray(FUSED)
    want = 0.5 * (np.abs(_gray(VIS) - gf).mean((1, 2, 3)) + np.abs(IR - gf).mean((1, 2, 3)))
    np.testing.assert_allclose(_terms(FUSED, VIS, IR)[:, 1], want, rtol=1e-5)


def test_sobel_matches_replicate_padded_loop():
    g = _gray(VIS)
    gx, gy = losses.sobel_abs(jnp.asarray(g, jnp.float32))
    want_x, want_y = _sobel_ref(g[0, ..., 0])
    np.testing.assert_allclose(gx[0, ..., 0], want_x, atol=1e-5)
    np.testing.assert_allclose(gy[0, ..., 0], want_y, atol=1e-5)


def test_grad_term_maxes_x_and_y_separately():
    want = []
    for i in range(B):
        fx, fy = _sobel_ref(_gray(FUSED[i])[..., 0])
        vx, vy = _sobel_ref(_gray(VIS[i])[..., 0])
        ix, iy = _sobel_ref(np.float64(IR[i, ..., 0]))
        want.append(np.abs(fx - np.maximum(vx, ix)).mean() + np.abs(fy - np.maximum(vy, iy)).mean())
    np.testing.assert_allclose(_terms(FUSED, VIS, IR)[:, 2], want, rtol=1e-5)


def test_ssim_term_is_rgb_plus_gray_ir():
    want = [
        (1 - _ssim_ref(VIS[i], FUSED[i])) + (1 - _ssim_ref(IR[i], _gray(FUSED[i])))
        for i in range(B)
    ]
    np.testing.assert_allclose(_terms(FUSED, VIS, IR)[:, 3], want, rtol=1e-5, atol=1e-6)


def test_color_term_is_cb_plus_cr_without_offset():
    (cb_v, cr_v), (cb_f, cr_f) = _cbcr(VIS), _cbcr(FUSED)
    want = np.abs(cb_v - cb_f).mean((1, 2)) + np.abs(cr_v - cr_f).mean((1, 2))
    np.testing.assert_allclose(_terms(FUSED, VIS, IR)[:, 4], want, rtol=1e-5)


def test_per_sample_weights_equal_mean_of_single_sample_losses():
    w = np.array([losses.IVF_TASK_WEIGHTS["low_light"], losses.IVF_TASK_WEIGHTS["motion_blur"]])
    w = w.astype(np.float32)
    total, parts = _loss(FUSED, VIS, IR, w)
    singles = [
        _loss(FUSED[i : i + 1], VIS[i : i + 1], IR[i : i + 1], w[i : i + 1])[0] for i in range(B)
    ]
    np.testing.assert_allclose(total, np.mean(singles), rtol=1e-6)
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-6)
    assert set(parts) == set(losses.WEIGHT_KEYS)
    # Weighting each sample by the other's row must change the loss (the pairing is real).
    assert not np.isclose(_loss(FUSED, VIS, IR, w[::-1])[0], total, rtol=1e-4)


def test_shared_weight_row_broadcasts():
    d = losses.default_weights(losses.IVF_TASK_WEIGHTS)
    a = _loss(FUSED, VIS, IR, np.tile(d, (B, 1)))[0]
    np.testing.assert_allclose(_loss(FUSED, VIS, IR, d)[0], a, rtol=1e-6)


def test_task_weights_mean_over_events():
    t = losses.IVF_TASK_WEIGHTS
    got = losses.task_weights(["low_light", "ir_noise"], t)
    np.testing.assert_allclose(got, (np.array(t["low_light"]) + t["ir_noise"]) / 2)
    np.testing.assert_allclose(losses.task_weights([], t), t["default"])
    np.testing.assert_allclose(losses.task_weights(["no_such_event"], t), t["default"])


def test_default_weights_by_name_or_table():
    np.testing.assert_array_equal(losses.default_weights("ivf"), [24, 40, 48, 2, 12])
    np.testing.assert_array_equal(
        losses.default_weights(losses.MED_TASK_WEIGHTS), [40, 80, 72, 4, 12]
    )
    assert losses.default_weights("medical").dtype == np.float32


def _features(seed):
    r = np.random.default_rng(seed)
    t = [
        r.normal(0, 1, (B, s, s, c)).astype(np.float32)
        for s, c in zip(SIDES, TEACHER_WIDTHS, strict=True)
    ]
    s = [
        r.normal(0, 1, (B, s, s, c)).astype(np.float32)
        for s, c in zip(SIDES, STUDENT_WIDTHS, strict=True)
    ]
    return s, t


def _adapt_ref(params, teacher_feats):
    return [
        np.asarray(f, np.float64) @ np.asarray(params[f"adapter_{i}"]["kernel"][0, 0], np.float64)
        + np.asarray(params[f"adapter_{i}"]["bias"])
        for i, f in enumerate(teacher_feats)
    ]


def test_adapter_init_shapes_from_arrays_and_torch_default_bounds():
    s, t = _features(0)
    p = losses.init_adapters(jax.random.key(0), s, t)
    for i, (ci, co) in enumerate(zip(TEACHER_WIDTHS, STUDENT_WIDTHS, strict=True)):
        k, b = np.asarray(p[f"adapter_{i}"]["kernel"]), np.asarray(p[f"adapter_{i}"]["bias"])
        assert k.shape == (1, 1, ci, co) and b.shape == (co,)
        bound = 1 / np.sqrt(ci)
        assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
        np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.1)  # uniform, not normal


@pytest.mark.parametrize("form", losses.DISTILL_FORMS)
def test_distill_is_base_only_when_student_matches_adapted_teacher(form):
    _, t = _features(1)
    p = losses.init_adapters(
        jax.random.key(1), [jax.ShapeDtypeStruct((c,), jnp.float32) for c in STUDENT_WIDTHS], t
    )
    s = losses.FeatureAdapters(STUDENT_WIDTHS).apply({"params": p}, t)
    d = losses.default_weights("ivf")
    total, m = _distill(FUSED, s, FUSED, t, p, VIS, IR, table_default_weights=d, form=form)
    assert abs(float(m["feat"])) < 1e-6 and abs(float(m["res"])) < 1e-6
    base = _loss(FUSED, VIS, IR, d)[0]
    np.testing.assert_allclose(total, base, rtol=1e-6)
    np.testing.assert_allclose(m["base_parent"], base, rtol=1e-6)


def _smooth_l1_ref(a, b):
    d = np.abs(a - b)
    return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_distill_forms_match_their_references():
    s, t = _features(2)
    p = losses.init_adapters(jax.random.key(2), s, t)
    a = _adapt_ref(p, t)
    teacher_out = FUSED + np.random.default_rng(3).normal(0, 2, FUSED.shape).astype(np.float32)
    assert (np.abs(teacher_out - FUSED) > 1).mean() > 0.2  # both SmoothL1 branches
    d = losses.default_weights("medical")
    got = {}
    for form in losses.DISTILL_FORMS:
        kw = dict(table_default_weights=d, form=form, feature_weight=0.1, result_weight=1.0)
        got[form] = _distill(FUSED, s, teacher_out, t, p, VIS, IR, **kw)
    paper_feat = sum(np.abs(np.float64(x) - y).mean() for x, y in zip(s, a, strict=True))
    paper_res = np.abs(np.float64(FUSED) - teacher_out).mean()
    off_feat = sum(
        _smooth_l1_ref(_unit(np.float64(x)), _unit(y)) for x, y in zip(s, a, strict=True)
    )
    off_res = _smooth_l1_ref(np.float64(FUSED), teacher_out)
    for form, feat, res in (("paper", paper_feat, paper_res), ("official", off_feat, off_res)):
        total, m = got[form]
        np.testing.assert_allclose(m["feat"], feat, rtol=1e-5)
        np.testing.assert_allclose(m["res"], res, rtol=1e-5)
        np.testing.assert_allclose(total, m["base_student"] + 0.1 * feat + res, rtol=1e-5)
        np.testing.assert_allclose(m["base_student"], _loss(FUSED, VIS, IR, d)[0], rtol=1e-6)
        assert set(m) >= {"base_parent", "feat_dec4", "feat_dec1", "student_ssim"}
    assert not np.isclose(got["paper"][0], got["official"][0], rtol=1e-3)


@pytest.mark.parametrize("form", losses.DISTILL_FORMS)
def test_distill_grads_never_reach_teacher_and_adapters_follow_form(form):
    s, t = _features(4)
    s[0][0, 0, 0] = 0.0  # a zero feature vector: L2 normalisation must keep grads finite
    p = losses.init_adapters(jax.random.key(4), s, t)
    teacher_out = FUSED[::-1].copy()
    d = losses.default_weights("ivf")

    def f(so, sf, to, tf, ap):
        return losses.distill_loss(so, sf, to, tf, ap, VIS, IR, table_default_weights=d, form=form)[
            0
        ]

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(FUSED, s, teacher_out, t, p)
    g_so, g_sf, g_to, g_tf, g_ap = jax.tree.map(np.asarray, g)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    assert not np.any(g_to) and not any(np.any(x) for x in g_tf)
    assert np.any(g_so) and all(np.any(x) for x in g_sf)
    adapter_moves = any(np.any(x) for x in jax.tree.leaves(g_ap))
    assert adapter_moves == losses.adapters_trainable(form)


def test_unknown_distill_form_is_rejected():
    with pytest.raises(ValueError, match="distill form"):
        losses.adapters_trainable("l2")
