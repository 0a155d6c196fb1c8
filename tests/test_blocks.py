"""Convolution, norm, FFN, FiLM layers and the pixel-blocked products against plain forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtpf_jax import attention, blocks


def test_pixel_shuffle_round_trip_and_torch_channel_order():
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
    y = np.asarray(blocks.pixel_unshuffle(jnp.asarray(x)))
    assert y.shape == (2, 3, 4, 12)
    # PyTorch: output channel c*4 + i*2 + j at (h, w) holds input (c, 2h+i, 2w+j).
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[..., c * 4 + i * 2 + j], x[:, i::2, j::2, c])
    np.testing.assert_array_equal(np.asarray(blocks.pixel_shuffle(jnp.asarray(y))), x)


def test_depthwise_shifted_form_equals_grouped_conv_forward_and_backward():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
    np.testing.assert_allclose(
        blocks.depthwise_conv3x3(x, w), blocks.depthwise_conv3x3_plain(x, w), atol=1e-5
    )
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
    dx, dw = jax.grad(loss(blocks.depthwise_conv3x3), (0, 1))(x, w)
    rx, rw = jax.grad(loss(blocks.depthwise_conv3x3_plain), (0, 1))(x, w)
    np.testing.assert_allclose(dx, rx, atol=1e-4)
    np.testing.assert_allclose(dw, rw, atol=1e-4)


def test_depthwise_of_a_padded_input_equals_grouped_conv_forward_and_backward():
    rng = np.random.default_rng(3)
    xp = jnp.asarray(rng.normal(size=(2, 11, 9, 5)), jnp.float32)  # any values in the border
    w = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
    valid = lambda xp, w: jax.lax.conv_general_dilated(  # no padding: the input is padded
        xp,
        w[:, :, None, :],
        (1, 1),
        ((0, 0), (0, 0)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5,
    )
    np.testing.assert_allclose(blocks.depthwise_conv3x3_padded(xp, w), valid(xp, w), atol=1e-5)
    loss = lambda f: lambda xp, w: jnp.sum(f(xp, w) * g)
    dxp, dw = jax.grad(loss(blocks.depthwise_conv3x3_padded), (0, 1))(xp, w)
    rxp, rw = jax.grad(loss(valid), (0, 1))(xp, w)
    np.testing.assert_allclose(dxp, rxp, atol=1e-4)  # the border rows/cols too
    np.testing.assert_allclose(dw, rw, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_project_dwconv_pads_before_the_1x1_conv_with_grads(bias):
    """The FFN / TSAB input path: equal to the 1x1 conv then the padded depthwise conv."""

    class Both(blocks.nn.Module):
        fused: bool

        @blocks.nn.compact
        def __call__(self, x):
            p, d = blocks.Conv1x1(12, bias, name="p"), blocks.DWConv3x3(name="d")
            return blocks.project_dwconv(x, p, d) if self.fused else d(p(x))

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10, 6, 4)), jnp.float32)
    params = Both(True).init(jax.random.key(0), x)["params"]
    if bias:
        params["p"]["bias"] = params["p"]["bias"] + 0.5  # a bias must not leak into the padding
    loss = lambda fused: lambda p, x: jnp.sum(jnp.sin(Both(fused).apply({"params": p}, x)))
    (got, g_got), (ref, g_ref) = (jax.value_and_grad(loss(f), (0, 1))(params, x) for f in (1, 0))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form,expect_identity", [("paper", True), ("official", False)])
def test_film_with_zero_gamma_beta(form, expect_identity):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 3, 5)), jnp.float32)
    t = jnp.ones((2, 512))
    mod = blocks.FiLM(form)
    params = mod.init(jax.random.key(0), x, t)["params"]
    params["fc_2"] = jax.tree.map(jnp.zeros_like, params["fc_2"])  # gamma = beta = 0
    y = mod.apply({"params": params}, x, t)
    if expect_identity:
        np.testing.assert_array_equal(y, x)
    else:
        np.testing.assert_array_equal(y, jnp.zeros_like(x))


def test_film_modulates_per_sample():
    x = jnp.ones((2, 2, 2, 4))
    t = jnp.stack([jnp.zeros(512), jnp.ones(512)])
    mod = blocks.FiLM("paper")
    params = mod.init(jax.random.key(0), x, t)["params"]
    y = np.asarray(mod.apply({"params": params}, x, t))
    assert not np.allclose(y[0], y[1])


def test_layernorm_matches_definition():
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 7)).astype(np.float32)
    mod = blocks.LayerNorm()
    params = {"weight": np.linspace(0.5, 2, 7, dtype=np.float32), "bias": np.arange(7.0) / 7}
    y = np.asarray(mod.apply({"params": params}, jnp.asarray(x)))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref * params["weight"] + params["bias"], atol=1e-5)


def test_pixel_blocked_products_equal_plain_einsums_with_grads(monkeypatch):
    # 30 pixels in blocks of at most 8: blocks of 6, the largest divisor.
    monkeypatch.setattr(blocks, "GRAM_BLOCK_PIXELS", 8)
    rng = np.random.default_rng(5)
    x, y = (jnp.asarray(rng.normal(size=(2, 30, 3, c)), jnp.float32) for c in (4, 5))
    jaxpr = str(jax.make_jaxpr(blocks.pixel_gram)(x, y))
    assert "f32[2,5,3,4,5]" in jaxpr or "f32[2,5,3,5,4]" in jaxpr  # 5 blocks, summed after

    def check(fast, plain, *args):
        probe = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
        got = jax.value_and_grad(probe(fast), argnums=tuple(range(len(args))))(*args)
        ref = jax.value_and_grad(probe(plain), argnums=tuple(range(len(args))))(*args)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, ref)

    check(blocks.pixel_gram, lambda a, b: jnp.einsum("bnhc,bnhd->bhcd", a, b), x, y)
    check(blocks.pixel_gram, lambda a, b: jnp.einsum("bnhc,bnhd->bhcd", a, b), y, x)
    kernel = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    check(blocks.pointwise, lambda a, k: jnp.einsum("...c,cd->...d", a, k), x, kernel)
    attn = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    check(attention.channel_mix, lambda a, v: jnp.einsum("bhcd,bnhd->bnhc", a, v), attn, y)


def test_gelu_is_torchs_exact_erf_form_with_its_derivative():
    x = np.linspace(-9.0, 9.0, 2001)
    phi = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    want = x * phi
    dwant = phi + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(blocks.gelu(xj), want, atol=2e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(blocks.gelu))(xj), dwant, atol=2e-6)
    # jax's tanh approximation differs by up to ~5e-4: the exact form must not drift to it.
    assert np.max(np.abs(jax.nn.gelu(xj, approximate=True) - want)) > 1e-4
