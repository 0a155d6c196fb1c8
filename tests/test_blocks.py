import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtpf_jax import blocks


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


def _naive_window_attention(x, p, heads, dh, ws=8, ows=12):
    """Per-query loops over the zero-padded overlapping key window (DESIGN §1, §10)."""
    b, h, w, c = x.shape
    qkv = x @ p["qkv"]["kernel"] + p["qkv"].get("bias", 0)  # padded after the bias
    q, k, v = np.split(qkv, 3, axis=-1)
    pad = (ows - ws) // 2
    kp = np.pad(k, ((0, 0), (pad, pad + ows), (pad, pad + ows), (0, 0)))
    vp = np.pad(v, ((0, 0), (pad, pad + ows), (pad, pad + ows), (0, 0)))
    out = np.zeros((b, h, w, heads * dh))
    for n in range(b):
        for r in range(h):
            for s in range(w):
                wr, wc = (r // ws) * ws, (s // ws) * ws  # window origin (unpadded)
                x_, y_ = r - wr, s - wc  # query position inside its 8x8 window
                for hd in range(heads):
                    sl = slice(hd * dh, (hd + 1) * dh)
                    qv = q[n, r, s, sl] * dh**-0.5
                    keys = kp[n, wr : wr + ows, wc : wc + ows, sl]  # padded offset cancels -pad
                    vals = vp[n, wr : wr + ows, wc : wc + ows, sl]
                    logit = np.einsum("d,ijd->ij", qv, keys)
                    i, j = np.meshgrid(np.arange(ows), np.arange(ows), indexing="ij")
                    logit = logit + (p["rel_height"][i - x_ + ows - 1] @ qv)
                    logit = logit + (p["rel_width"][j - y_ + ows - 1] @ qv)
                    a = np.exp(logit - logit.max())
                    a /= a.sum()
                    out[n, r, s, sl] = np.einsum("ij,ijd->d", a, vals)
    return out @ p["project_out"]["kernel"] + p["project_out"].get("bias", 0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("band_rows", [None, 1])
@pytest.mark.parametrize("size", [(24, 16), (21, 13)])  # whole windows; partial last ones
def test_window_attention_equals_naive_reference(monkeypatch, bias, band_rows, size):
    heads, dh = 2, 4
    x = np.random.default_rng(2).normal(size=(1, *size, 6)).astype(np.float32)
    if band_rows:  # logits per window row: 2 windows x 2 heads x 64 x 144
        monkeypatch.setattr(blocks, "WINDOW_CHUNK_LOGITS", band_rows * 2 * 2 * 64 * 144)
    mod = blocks.WindowAttention(heads, dh, bias=bias)
    params = mod.init(jax.random.key(0), jnp.asarray(x))["params"]
    if bias:  # torch's init draws biases near 0: make them count
        params = {
            k: {**v, "bias": v["bias"] + 0.5} if isinstance(v, dict) else v
            for k, v in params.items()
        }
    got = np.asarray(jax.jit(mod.apply)({"params": params}, jnp.asarray(x)))
    ref = _naive_window_attention(x.astype(np.float64), jax.tree.map(np.asarray, params), heads, dh)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_window_attention_by_row_bands_equals_one_piece_with_grads(monkeypatch):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 40, 24, 6)), jnp.float32)
    mod = blocks.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x)["params"]
    loss = lambda p, u: jnp.sum(jnp.sin(mod.apply({"params": p}, u)))
    loops = []
    real = blocks.lax.fori_loop
    monkeypatch.setattr(
        blocks.lax, "fori_loop", lambda a, b, f, x: loops.append((a, b)) or real(a, b, f, x)
    )

    def run(limit):
        monkeypatch.setattr(blocks, "WINDOW_CHUNK_LOGITS", limit)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    whole = run(10**9)
    assert loops == []
    banded = run(2 * 3 * 2 * 64 * 144)  # 5 window rows of 2 images x 3 windows x 2 heads
    assert loops == [(0, 5)]  # bands of one row
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, banded)


def test_row_bands_are_the_largest_divisor_under_the_limit():
    seen = []

    def fn(xb, row0):  # window 2, overlap 2: output rows are the band's rows 1 .. -1
        seen.append(xb.shape)
        return xb[:, 1:-1] * 2 + 0 * row0

    xp = jnp.arange(2 * 26 * 3, dtype=jnp.float32).reshape(2, 26, 3)  # 12 window rows of 2
    out = blocks.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=50)
    np.testing.assert_array_equal(out, xp[:, 1:-1] * 2)
    assert seen[-1] == (2, 4 * 2 + 2, 3)  # bands of 4 rows (5 would not divide 12) + overlap
    seen.clear()
    blocks.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=120)
    assert seen == [(2, 26, 3)]  # fits: one piece, no loop
    seen.clear()
    out = blocks.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=5)
    assert seen[-1] == (2, 1 * 2 + 2, 3)  # one row is already over the limit: bands of one
    np.testing.assert_array_equal(out, xp[:, 1:-1] * 2)


def test_channel_attention_equals_numpy_reference():
    heads = 2
    x = np.random.default_rng(3).normal(size=(1, 5, 6, 4)).astype(np.float32)
    mod = blocks.ChannelAttention(heads)
    params = mod.init(jax.random.key(1), jnp.asarray(x))["params"]
    params = jax.tree.map(np.asarray, params)
    params["temperature"] = np.array([0.7, 1.9], np.float32)
    got = np.asarray(mod.apply({"params": params}, jnp.asarray(x)))
    qkv = np.asarray(
        blocks.depthwise_conv3x3_plain(
            jnp.asarray(x @ params["qkv"]["kernel"]), jnp.asarray(params["qkv_dwconv"]["kernel"])
        )
    )
    out = np.zeros((5 * 6, 4))
    for hd in range(heads):
        q, k, v = (
            qkv[0, ..., t * 4 + hd * 2 : t * 4 + hd * 2 + 2].reshape(-1, 2) for t in range(3)
        )
        q, k = q / np.linalg.norm(q, axis=0), k / np.linalg.norm(k, axis=0)
        a = (q.T @ k) * params["temperature"][hd]
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out[:, hd * 2 : hd * 2 + 2] = (a @ v.T).T
    ref = (out @ params["project_out"]["kernel"]).reshape(1, 5, 6, 4)
    np.testing.assert_allclose(got, ref, atol=1e-5)


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


def test_head_windows_gather_equals_reshape_form_and_its_vjp():
    rng = np.random.default_rng(6)
    t = jnp.asarray(rng.normal(size=(2, 16, 24, 6)), jnp.float32)
    tp = blocks.pad_for_windows(t, 4)
    assert tp.shape == (2, 20, 28, 6)
    got = blocks.head_windows(tp, 2, 8, 4)
    ref = blocks._head_windows_plain(tp, 2, 8, 4)
    assert got.shape == (2, 2, 3, 2, 144, 3)
    np.testing.assert_array_equal(got, ref)
    g = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
    (dt,) = jax.vjp(lambda u: blocks.head_windows(blocks.pad_for_windows(u, 4), 2, 8, 4), t)[1](g)
    # Reference VJP: autodiff of a plain gather (a scatter-add) from the zero-padded input.
    rows = np.arange(2)[:, None] * 8 + np.arange(12)
    cols = np.arange(3)[:, None] * 8 + np.arange(12)

    def gather(u):
        up = jnp.pad(u, ((0, 0), (2, 2), (2, 2), (0, 0)))
        w = up[:, rows[:, None, :, None], cols[None, :, None, :]]  # b, nh, nw, 12, 12, c
        return w.reshape(2, 2, 3, 144, 2, 3).transpose(0, 1, 2, 4, 3, 5)

    np.testing.assert_array_equal(gather(t), ref)
    (rt,) = jax.vjp(gather, t)[1](g)
    np.testing.assert_allclose(dt, rt, atol=1e-5)


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
    check(blocks.channel_mix, lambda a, v: jnp.einsum("bhcd,bnhd->bnhc", a, v), attn, y)


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


@pytest.mark.parametrize("ws,ows", [(8, 12), (4, 6)])
def test_rel_pos_logits_dense_vjp_equals_gather_vjp(ws, ows):
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 3, 2, 2, ws * ws, 5)), jnp.float32)
    rh, rw = (jnp.asarray(rng.normal(size=(2 * ows - 1, 5)), jnp.float32) for _ in range(2))
    cot = tuple(jnp.asarray(rng.normal(size=(*q.shape[:-1], ows)), jnp.float32) for _ in range(2))
    outs, grads = [], []
    for fn in (blocks.rel_pos_logits, blocks._rel_pos_logits_plain):
        out, vjp = jax.vjp(lambda a, b, c, fn=fn: fn(a, b, c, ws, ows), q, rh, rw)
        outs.append(out)
        grads.append(vjp(cot))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # Exactly the table rows that some (query, key) pair uses receive gradient.
    used = np.zeros(2 * ows - 1, bool)
    used[np.unique(blocks.rel_pos_index(ws, ows)[0])] = True
    assert np.all(np.any(np.asarray(grads[0][1]) != 0, axis=1) == used)
    assert not used.all()  # the 8x8-in-12x12 geometry never reaches the outer rows


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_window_attention_bands_only_on_cpu(monkeypatch, backend):
    # On CPU a layer over the band limit becomes a loop over bands; on accelerators only the
    # much larger memory limit applies, so the same layer stays one piece.
    x = jnp.zeros((1, 32, 16, 6), jnp.float32)
    mod = blocks.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x)
    monkeypatch.setattr(blocks, "WINDOW_CHUNK_LOGITS", 2 * 2 * 64 * 144)  # one window row
    monkeypatch.setattr(blocks.jax, "default_backend", lambda: backend)
    jaxpr = str(jax.make_jaxpr(mod.apply)(params, x))
    looped = "scan[" in jaxpr or "while[" in jaxpr  # fori_loop with static bounds is a scan
    assert looped == (backend == "cpu")


def test_window_attention_bands_under_the_data_parallel_shard_map(monkeypatch):
    # Through the training steps' wrapper (4 fake devices): the band loop's carry must keep
    # the batch's device-variance, and the banded step must give the one-piece loss and grads.
    from dtpf_jax import parallel

    mesh = parallel.make_mesh()
    x = jnp.asarray(np.random.default_rng(7).normal(size=(mesh.size, 32, 16, 6)), jnp.float32)
    mod = blocks.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x[:1])["params"]

    def step(p, u):
        local = lambda p: jnp.sum(jnp.sin(mod.apply({"params": parallel.device_varying(p)}, u)))
        return jax.value_and_grad(lambda p: parallel.global_mean(local(p)))(p)

    def run(limit):
        monkeypatch.setattr(blocks, "WINDOW_CHUNK_LOGITS", limit)
        fn = parallel.data_parallel_step(step, mesh, num_args=2)
        looped = "scan[" in str(jax.make_jaxpr(fn)(params, x))
        return looped, fn(jax.tree.map(jnp.copy, params), x)  # argument 0 is donated

    (looped_whole, whole), (looped, banded) = run(10**9), run(2 * 2 * 64 * 144)
    assert not looped_whole and looped  # one piece, then bands of one window row per device
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), whole, banded)
