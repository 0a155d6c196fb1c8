"""Channel and overlapping-window attention against plain references; row bands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtpf_jax import attention, blocks


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
        monkeypatch.setattr(attention, "WINDOW_CHUNK_LOGITS", band_rows * 2 * 2 * 64 * 144)
    mod = attention.WindowAttention(heads, dh, bias=bias)
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
    mod = attention.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x)["params"]
    loss = lambda p, u: jnp.sum(jnp.sin(mod.apply({"params": p}, u)))
    loops = []
    real = attention.lax.fori_loop
    monkeypatch.setattr(
        attention.lax, "fori_loop", lambda a, b, f, x: loops.append((a, b)) or real(a, b, f, x)
    )

    def run(limit):
        monkeypatch.setattr(attention, "WINDOW_CHUNK_LOGITS", limit)
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
    out = attention.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=50)
    np.testing.assert_array_equal(out, xp[:, 1:-1] * 2)
    assert seen[-1] == (2, 4 * 2 + 2, 3)  # bands of 4 rows (5 would not divide 12) + overlap
    seen.clear()
    attention.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=120)
    assert seen == [(2, 26, 3)]  # fits: one piece, no loop
    seen.clear()
    out = attention.over_window_row_bands(fn, xp, 2, 2, elements_per_row=10, limit=5)
    assert seen[-1] == (2, 1 * 2 + 2, 3)  # one row is already over the limit: bands of one
    np.testing.assert_array_equal(out, xp[:, 1:-1] * 2)


def test_channel_attention_equals_numpy_reference():
    heads = 2
    x = np.random.default_rng(3).normal(size=(1, 5, 6, 4)).astype(np.float32)
    mod = attention.ChannelAttention(heads)
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


def test_head_windows_gather_equals_reshape_form_and_its_vjp():
    rng = np.random.default_rng(6)
    t = jnp.asarray(rng.normal(size=(2, 16, 24, 6)), jnp.float32)
    tp = attention.pad_for_windows(t, 4)
    assert tp.shape == (2, 20, 28, 6)
    got = attention.head_windows(tp, 2, 8, 4)
    ref = attention._head_windows_plain(tp, 2, 8, 4)
    assert got.shape == (2, 2, 3, 2, 144, 3)
    np.testing.assert_array_equal(got, ref)
    g = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
    windows = lambda u: attention.head_windows(attention.pad_for_windows(u, 4), 2, 8, 4)
    (dt,) = jax.vjp(windows, t)[1](g)
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


@pytest.mark.parametrize("ws,ows", [(8, 12), (4, 6)])
def test_rel_pos_logits_dense_vjp_equals_gather_vjp(ws, ows):
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 3, 2, 2, ws * ws, 5)), jnp.float32)
    rh, rw = (jnp.asarray(rng.normal(size=(2 * ows - 1, 5)), jnp.float32) for _ in range(2))
    cot = tuple(jnp.asarray(rng.normal(size=(*q.shape[:-1], ows)), jnp.float32) for _ in range(2))
    outs, grads = [], []
    for fn in (attention.rel_pos_logits, attention._rel_pos_logits_plain):
        out, vjp = jax.vjp(lambda a, b, c, fn=fn: fn(a, b, c, ws, ows), q, rh, rw)
        outs.append(out)
        grads.append(vjp(cot))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # Exactly the table rows that some (query, key) pair uses receive gradient.
    used = np.zeros(2 * ows - 1, bool)
    used[np.unique(attention.rel_pos_index(ws, ows)[0])] = True
    assert np.all(np.any(np.asarray(grads[0][1]) != 0, axis=1) == used)
    assert not used.all()  # the 8x8-in-12x12 geometry never reaches the outer rows


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_window_attention_bands_only_on_cpu(monkeypatch, backend):
    # On CPU a layer over the band limit becomes a loop over bands; on accelerators only the
    # much larger memory limit applies, so the same layer stays one piece.
    x = jnp.zeros((1, 32, 16, 6), jnp.float32)
    mod = attention.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x)
    monkeypatch.setattr(attention, "WINDOW_CHUNK_LOGITS", 2 * 2 * 64 * 144)  # one window row
    monkeypatch.setattr(attention.jax, "default_backend", lambda: backend)
    jaxpr = str(jax.make_jaxpr(mod.apply)(params, x))
    looped = "scan[" in jaxpr or "while[" in jaxpr  # fori_loop with static bounds is a scan
    assert looped == (backend == "cpu")


def test_window_attention_bands_under_the_data_parallel_shard_map(monkeypatch):
    # Through the training steps' wrapper (4 fake devices): the band loop's carry must keep
    # the batch's device-variance, and the banded step must give the one-piece loss and grads.
    from dtpf_jax import parallel

    mesh = parallel.make_mesh()
    x = jnp.asarray(np.random.default_rng(7).normal(size=(mesh.size, 32, 16, 6)), jnp.float32)
    mod = attention.WindowAttention(2, 4)
    params = mod.init(jax.random.key(0), x[:1])["params"]

    def step(p, u):
        local = lambda p: jnp.sum(jnp.sin(mod.apply({"params": parallel.device_varying(p)}, u)))
        return jax.value_and_grad(lambda p: parallel.global_mean(local(p)))(p)

    def run(limit):
        monkeypatch.setattr(attention, "WINDOW_CHUNK_LOGITS", limit)
        fn = parallel.data_parallel_step(step, mesh, num_args=2)
        looped = "scan[" in str(jax.make_jaxpr(fn)(params, x))
        return looped, fn(jax.tree.map(jnp.copy, params), x)  # argument 0 is donated

    (looped_whole, whole), (looped, banded) = run(10**9), run(2 * 2 * 64 * 144)
    assert not looped_whole and looped  # one piece, then bands of one window row per device
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), whole, banded)
