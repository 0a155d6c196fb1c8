"""Building blocks of the X-Restormer fusion U-Net (NHWC), named after the official tensors.

TSAB = `ChannelAttention` (transposed attention over channels), SSAB = `WindowAttention`
(overlapping-window spatial attention, "OCAB"), `TransformerBlock` = TSAB + FFN + SSAB + FFN,
SCFM = `CrossAttention` (level 4) + `AttentionFusion` (every level), text modulation = `FiLM`.

Speed on CPU drives three formulations, each kept numerically equal to a plain one (tests):
depthwise 3x3 convs are nine shifted multiply-adds with a hand-written VJP (XLA:CPU's grouped
convolution is several times slower), the overlapping 12x12 key windows are built from
reshapes and concatenations instead of gathers, and every contraction over pixels (1x1-conv
kernel gradients, TSAB's channel Gram matrices) runs on blocks of pixels (`pixel_gram`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def torch_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch's default conv/linear init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class Conv1x1(nn.Module):
    """1x1 convolution as a matrix product over the channel axis; kernel (in, out)."""

    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (cin, self.features))
        y = pointwise(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(cin), (self.features,)).astype(x.dtype)
        return y


# Pixels per block of `pixel_gram`: its per-block (C, D) products keep the transposes that a
# contraction over pixels needs inside the cache.
GRAM_BLOCK_PIXELS = 512


def pixel_gram(x, y):
    """sum_n x[:, n, :, :, None] * y[:, n, :, None, :]: (B, N, H, C), (B, N, H, D) -> (B, H, C, D).

    A contraction over the pixel axis, which is the major one in NHWC. As one dot, XLA:CPU
    transposes both whole operands (or the fusions that produce them) to pixel-minor layouts
    with strided writes; as a batch of products over blocks of GRAM_BLOCK_PIXELS pixels, summed,
    each transpose is cache-sized. Same sum, different association (float rounding). The
    narrower operand is the one transposed. Student train step, batch 4 at 128², same
    process: 13.4 -> 11.7 s; forward at 512x640: 12.2 -> 10.9 s.
    """
    if x.shape[-1] > y.shape[-1]:  # transpose the narrower operand
        return jnp.swapaxes(pixel_gram(y, x), -1, -2)
    b, n, h, c = x.shape
    nb = max(d for d in range(1, min(GRAM_BLOCK_PIXELS, n) + 1) if n % d == 0)
    xb = x.reshape(b, n // nb, nb, h, c)
    yb = y.reshape(b, n // nb, nb, h, y.shape[-1])
    return jnp.einsum("bjnhc,bjnhd->bjhcd", xb, yb).sum(1)


@jax.custom_vjp
def pointwise(x, kernel):
    """x (..., C) @ kernel (C, D): a 1x1 conv whose kernel gradient is a blocked `pixel_gram`."""
    return jnp.einsum("...c,cd->...d", x, kernel)


def _pointwise_fwd(x, kernel):
    return pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
    x, kernel = res
    c, d = kernel.shape
    dx = jnp.einsum("...d,cd->...c", g, kernel)
    dk = pixel_gram(x.reshape(1, -1, 1, c), g.reshape(1, -1, 1, d))[0, 0]
    return dx, dk.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@jax.custom_vjp
def channel_mix(attn, v):
    """out[b, n, h, c] = sum_d attn[b, h, c, d] v[b, n, h, d]; attn's gradient by `pixel_gram`."""
    return jnp.einsum("bhcd,bnhd->bnhc", attn, v)


def _channel_mix_fwd(attn, v):
    return channel_mix(attn, v), (attn, v)


def _channel_mix_bwd(res, g):
    attn, v = res
    return pixel_gram(g, v).astype(attn.dtype), jnp.einsum("bhcd,bnhc->bnhd", attn, g)


channel_mix.defvjp(_channel_mix_fwd, _channel_mix_bwd)


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, zero padding 1; kernel (3, 3, in, out)."""

    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (3, 3, cin, self.features))
        y = lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(cin * 9), (self.features,)).astype(x.dtype)
        return y


def _shift_sum(xp, w, h, wd):
    """sum_ij xp[:, i:i+h, j:j+wd] * w[i, j] for a 3x3 kernel w (3, 3, C)."""
    out = xp[:, 0:h, 0:wd] * w[0, 0]
    for i in range(3):
        for j in range(3):
            if i or j:
                out = out + xp[:, i : i + h, j : j + wd] * w[i, j]
    return out


@jax.custom_vjp
def depthwise_conv3x3(x, w):
    """Depthwise 3x3 correlation with zero padding 1: x (B, H, W, C), w (3, 3, C)."""
    h, wd = x.shape[1:3]
    return _shift_sum(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), w, h, wd)


def _dw_fwd(x, w):
    return depthwise_conv3x3(x, w), (x, w)


def _dw_bwd(res, g):
    x, w = res
    h, wd = x.shape[1:3]
    # The transpose of a correlation is the correlation with the flipped kernel.
    dx = _shift_sum(jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0))), w[::-1, ::-1], h, wd)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return dx, _dw_kernel_grad(xp, g).astype(w.dtype)


def _dw_kernel_grad(xp, g):
    """d/dw of sum(g * shift_sum(xp, w)): (3, 3, C)."""
    h, wd = g.shape[1:3]
    tap = lambda i, j: jnp.sum(xp[:, i : i + h, j : j + wd] * g, axis=(0, 1, 2))
    return jnp.stack([jnp.stack([tap(i, j) for j in range(3)]) for i in range(3)])


depthwise_conv3x3.defvjp(_dw_fwd, _dw_bwd)


@jax.custom_vjp
def depthwise_conv3x3_padded(xp, w):
    """depthwise_conv3x3 of an input already zero-padded by 1: xp (B, H + 2, W + 2, C)."""
    h, wd = xp.shape[1] - 2, xp.shape[2] - 2
    return _shift_sum(xp, w, h, wd)


def _dwp_fwd(xp, w):
    return depthwise_conv3x3_padded(xp, w), (xp, w)


def _dwp_bwd(res, g):
    xp, w = res
    h, wd = g.shape[1:3]
    # d/dxp of sum_ij xp[i:i+h, j:j+w] w_ij: g padded by 2, correlated with the flipped kernel.
    dxp = _shift_sum(jnp.pad(g, ((0, 0), (2, 2), (2, 2), (0, 0))), w[::-1, ::-1], h + 2, wd + 2)
    return dxp, _dw_kernel_grad(xp, g).astype(w.dtype)


depthwise_conv3x3_padded.defvjp(_dwp_fwd, _dwp_bwd)


def depthwise_conv3x3_plain(x, w):
    """Reference: XLA grouped convolution (slow on CPU, used by tests)."""
    return lax.conv_general_dilated(
        x,
        w[:, :, None, :],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


class DWConv3x3(nn.Module):
    """Depthwise 3x3 conv, no bias; kernel (3, 3, C). padded=True: x is already zero-padded
    by 1 on each side (as `project_dwconv` makes it) and the output is 2 rows/cols smaller."""

    @nn.compact
    def __call__(self, x, padded: bool = False):
        c = x.shape[-1]
        kernel = self.param(
            "kernel", lambda k, s: torch_kernel_init(k, s[:2] + (1, s[2]))[:, :, 0], (3, 3, c)
        )
        conv = depthwise_conv3x3_padded if padded else depthwise_conv3x3
        return conv(x, kernel.astype(x.dtype))


def project_dwconv(x, project: Conv1x1, dwconv: DWConv3x3):
    """dwconv(project(x)) for a 1x1 conv without bias: the depthwise conv's zero padding is
    applied to x, before the 1x1 conv (which maps zeros to zeros), instead of to the wider
    output (2-3x the channels): one smaller copy, and the product writes the padded tensor.
    """
    if project.use_bias:
        return dwconv(project(x))
    return dwconv(project(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))), padded=True)


class LayerNorm(nn.Module):
    """'WithBias' LayerNorm over channels at each pixel (eps 1e-5, biased variance)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) * lax.rsqrt(var + self.eps) * weight.astype(x.dtype) + bias.astype(x.dtype)


def pixel_unshuffle(x, r: int = 2):
    """PyTorch PixelUnshuffle in NHWC: out channel c*r*r + i*r + j <- (c, r*h + i, r*w + j)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x, r: int = 2):
    """PyTorch PixelShuffle in NHWC, the inverse of `pixel_unshuffle`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


class Downsample(nn.Module):
    """3x3 conv C -> C/2, then PixelUnshuffle(2): 2C channels at half resolution."""

    @nn.compact
    def __call__(self, x):
        return pixel_unshuffle(Conv3x3(x.shape[-1] // 2, name="body_0")(x))


class Upsample(nn.Module):
    """3x3 conv C -> 2C, then PixelShuffle(2): C/2 channels at double resolution."""

    @nn.compact
    def __call__(self, x):
        return pixel_shuffle(Conv3x3(x.shape[-1] * 2, name="body_0")(x))


class ChannelAttention(nn.Module):
    """TSAB attention (MDTA): heads x (C_h x C_h) attention over L2-normalised q, k."""

    heads: int
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = project_dwconv(x, Conv1x1(3 * c, self.bias, name="qkv"), DWConv3x3(name="qkv_dwconv"))
        # Materialise q, k, v once: otherwise XLA recomputes the 9-tap conv inside each of the
        # five fusions that read a slice of it.
        qkv = lax.optimization_barrier(qkv)
        q, k, v = (t.reshape(b, h * w, self.heads, c // self.heads) for t in jnp.split(qkv, 3, -1))
        # q, k are L2-normalised over the spatial axis (F.normalize, eps 1e-12); scaling the
        # small C_h x C_h Gram matrix instead of the two full-size tensors is the same product.
        temperature = self.param("temperature", nn.initializers.ones, (self.heads,))
        # rsqrt of the clamped square: same value as 1/max(|q|, 1e-12), but a finite gradient
        # on flat (all-zero) inputs where sqrt's derivative is infinite.
        inv_q = lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(q), axis=1), 1e-24))  # (b, h, c)
        inv_k = lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(k), axis=1), 1e-24))
        attn = pixel_gram(q, k) * inv_q[..., :, None] * inv_k[..., None, :]
        attn = jax.nn.softmax(attn * temperature.astype(x.dtype)[:, None, None], axis=-1)
        out = channel_mix(attn, v).reshape(b, h, w, c)
        return Conv1x1(c, self.bias, name="project_out")(out)


def pad_for_windows(t, overlap: int, window: int = 1):
    """The zero padding of the key/value windows: overlap/2 on every side (DESIGN §10), and
    at the bottom/right up to whole windows of `window` (zeros like any border)."""
    p = overlap // 2
    eh, ew = -t.shape[1] % window, -t.shape[2] % window
    return jnp.pad(t, ((0, 0), (p, p + eh), (p, p + ew), (0, 0)))


def overlap_windows(tp, window: int, overlap: int):
    """Overlapping (window+overlap)^2 windows at stride `window` of a padded tensor.

    tp (B, H + o, W + o, C), from pad_for_windows -> (B, H/w, W/w, (w+o)^2, C), window
    positions row-major; built from a reshape into blocks (after a further zero padding to
    whole blocks) and a concatenation with the first `o` rows/cols of the next block.
    """
    b, hp, wp, c = tp.shape
    nh, nw = (hp - overlap) // window, (wp - overlap) // window
    tp = jnp.pad(tp, ((0, 0), (0, (nh + 1) * window - hp), (0, (nw + 1) * window - wp), (0, 0)))
    blocks = tp.reshape(b, nh + 1, window, nw + 1, window, c)
    rows = jnp.concatenate([blocks[:, :-1], blocks[:, 1:, :overlap]], axis=2)
    win = jnp.concatenate([rows[:, :, :, :-1], rows[:, :, :, 1:, :overlap]], axis=4)
    ws = window + overlap
    return win.transpose(0, 1, 3, 2, 4, 5).reshape(b, nh, nw, ws * ws, c)


def _head_windows_plain(tp, heads: int, window: int, overlap: int):
    win = overlap_windows(tp, window, overlap)
    return win.reshape(*win.shape[:4], heads, tp.shape[-1] // heads).transpose(0, 1, 2, 4, 3, 5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def head_windows(tp, heads: int, window: int, overlap: int):
    """Key/value windows per head of a padded tensor (pad_for_windows):
    (B, H + o, W + o, heads*d) -> (B, H/w, W/w, heads, (w+o)^2, d).

    Forward by one gather (half the time of reshapes + concatenations + transposes on CPU);
    backward by the transpose of the reshape form, since a gather's VJP is a slow scatter.
    """
    b, hp, wp, c = tp.shape
    nh, nw, ws = (hp - overlap) // window, (wp - overlap) // window, window + overlap
    tp = tp.reshape(b, hp, wp, heads, c // heads).transpose(0, 3, 1, 2, 4)
    rows = np.arange(nh)[:, None] * window + np.arange(ws)[None, :]
    cols = np.arange(nw)[:, None] * window + np.arange(ws)[None, :]
    g = tp[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # b, heads, nh, nw, ws, ws, d
    return g.reshape(b, heads, nh, nw, ws * ws, c // heads).transpose(0, 2, 3, 1, 4, 5)


def _head_windows_fwd(tp, heads, window, overlap):
    return head_windows(tp, heads, window, overlap), tp.shape


def _head_windows_bwd(heads, window, overlap, shape, g):
    # full_like keeps g's device-variance under shard_map (jnp.zeros would be invariant).
    zeros = lax.full_like(g, 0, shape=shape)
    _, vjp = jax.vjp(lambda u: _head_windows_plain(u, heads, window, overlap), zeros)
    return vjp(g)


head_windows.defvjp(_head_windows_fwd, _head_windows_bwd)


def rel_pos_index(window: int, overlap_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into the 1-D tables: (w*w, ows) for heights and widths (DESIGN §10).

    The bias of query (x, y) and key (i, j) is q.rel_height[i - x + ows - 1] +
    q.rel_width[j - y + ows - 1].
    """
    xs = np.arange(window)
    ks = np.arange(overlap_window)
    rel = ks[None, :] - xs[:, None] + overlap_window - 1  # (w, ows)
    h_idx = np.repeat(rel, window, axis=0)  # query (x, y) -> row x
    w_idx = np.tile(rel, (window, 1))  # query (x, y) -> col y
    return h_idx, w_idx


class WindowAttention(nn.Module):
    """SSAB attention (OCAB): 8x8 query windows, 12x12 zero-padded key/value windows,
    1-D relative-position tables, no mask; inner width heads*dim_head independent of C.

    Any H, W: a partial last window row/column gets zero keys and values beyond the image,
    as at every image border (the official unfold's padding), and its queries there are
    dropped; for H, W multiples of the window this is the official layer exactly.
    """

    heads: int
    dim_head: int
    window: int = 8
    overlap_ratio: float = 0.5
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        ws, nh_, dh = self.window, self.heads, self.dim_head
        ows = ws + int(ws * self.overlap_ratio)
        p, inner = (ows - ws) // 2, nh_ * dh
        qkv_conv = Conv1x1(3 * inner, self.bias, name="qkv")
        out_conv = Conv1x1(c, self.bias, name="project_out")
        init = lambda key, shape: jax.random.normal(key, shape) * dh**-0.5
        rel_h = self.param("rel_height", init, (2 * ows - 1, dh)).astype(x.dtype)
        rel_w = self.param("rel_width", init, (2 * ows - 1, dh)).astype(x.dtype)
        out_conv(qkv_conv(x[:, :0])[..., :inner])  # creates the params outside any loop
        qkv = qkv_conv.variables["params"]  # used in two parts: q and (k, v)
        kernel = qkv["kernel"].astype(x.dtype)
        bias = qkv["bias"].astype(x.dtype) if self.bias else None

        def attend(xb, row0):
            # xb: rows row0 .. row0 + 8n + 2p of the padded x -> rows row0 .. row0 + 8n of out.
            bn, n, nw = xb.shape[0], (xb.shape[1] - 2 * p) // ws, wr // ws
            q = pointwise(xb[:, p : p + n * ws, p : p + wr], kernel[:, :inner])
            q = q if bias is None else q + bias[:inner]
            q = q.reshape(bn, n, ws, nw, ws, nh_, dh).transpose(0, 1, 3, 5, 2, 4, 6)
            q = q.reshape(bn, n, nw, nh_, ws * ws, dh) * (dh**-0.5)
            kv = pointwise(xb, kernel[:, inner:])  # zero at the padding, as 1x1 conv(0) = 0 ...
            if bias is not None:  # ... but for the bias: add it inside the image only
                r = row0 + lax.broadcasted_iota(jnp.int32, (xb.shape[1], xb.shape[2], 1), 0)
                col = lax.broadcasted_iota(jnp.int32, (xb.shape[1], xb.shape[2], 1), 1)
                inside = (r >= p) & (r < p + h) & (col >= p) & (col < p + w)
                kv = kv + inside.astype(kv.dtype) * bias[inner:]
            k, v = (head_windows(t, nh_, ws, ows - ws) for t in jnp.split(kv, 2, axis=-1))
            out = _window_attend(q, k, v, rel_h=rel_h, rel_w=rel_w, ws=ws, ows=ows)
            out = out.reshape(bn, n, nw, nh_, ws, ws, dh).transpose(0, 1, 4, 2, 5, 3, 6)
            return out_conv(out.reshape(bn, n * ws, wr, inner))

        hr, wr = -(-h // ws) * ws, -(-w // ws) * ws  # whole windows
        logits_per_row = b * (wr // ws) * nh_ * ws * ws * ows * ows
        xp = pad_for_windows(x, ows - ws, ws)
        out = over_window_row_bands(attend, xp, ws, ows - ws, logits_per_row)
        return out if (hr, wr) == (h, w) else out[:, :h, :w]


# Window attention runs a band of window rows at a time when its logits (batch x windows x
# heads x 64 x 144) would be over this many elements. XLA:CPU's fused attention keeps a
# layer's logits in memory, and once they outgrow the cache (L3 is 32 MB here; the student's
# 4-head SCFM attention has 9.4 M elements at 128²) it runs at a third of the speed; at
# 480x640 the key/value windows (2.25x the keys) would also be built for the whole image
# first. A band builds its own windows from a slice of the input and keeps both in cache.
# Student forward, A/B in one process (medians): 128² 286 -> 253 ms, 512x640 6.59 -> 5.64 s
# (with the sliced relative-position forward). On GPU/TPU a band loop would serialise work,
# so there the limit only bounds memory (2 GB of logits).
WINDOW_CHUNK_LOGITS = 2**21
WINDOW_CHUNK_LOGITS_ACCELERATOR = 2**29


def window_chunk_limit() -> int:
    """The band limit for the backend that jit compiles for by default."""
    cpu = jax.default_backend() == "cpu"
    return WINDOW_CHUNK_LOGITS if cpu else WINDOW_CHUNK_LOGITS_ACCELERATOR


def over_window_row_bands(fn, xp, window: int, overlap: int, elements_per_row: int, limit=None):
    """Window attention by bands of window rows, when a band is worth it.

    xp (B, H + o, W + o, C) is the input padded by pad_for_windows; fn(xb, row0) maps its
    rows row0 .. row0 + n*window + o (a band's windows with their overlap) to the band's
    n*window output rows (B, n*window, W, C'). The band is the largest divisor n of the
    H/window window rows whose `elements_per_row` (fn's large intermediate, the logits, per
    window row) stay at or under `limit` (default: window_chunk_limit()); as fn treats
    window rows independently, the result is the same as one call fn(xp, 0).
    """
    limit = window_chunk_limit() if limit is None else limit
    height = xp.shape[1] - overlap
    rows = height // window
    if rows * elements_per_row <= limit:
        return fn(xp, 0)
    fits = [d for d in range(1, rows + 1) if rows % d == 0 and d * elements_per_row <= limit]
    band = max(fits, default=1) * window  # one row per band when even one is over the limit
    piece = lambda i: fn(lax.dynamic_slice_in_dim(xp, i * band, band + overlap, 1), i * band)
    shape = jax.eval_shape(piece, 0)
    # full_like keeps xp's device-variance under shard_map (jnp.zeros would not).
    out = lax.full_like(xp, 0, shape.dtype, (shape.shape[0], height, *shape.shape[2:]))
    body = lambda i, out: lax.dynamic_update_slice_in_dim(out, piece(i), i * band, 1)
    return lax.fori_loop(0, height // band, body, out)


def _rel_pos_logits_plain(q, rel_h, rel_w, ws: int, ows: int):
    h_idx, w_idx = rel_pos_index(ws, ows)
    rows = np.arange(ws * ws)[:, None]
    return (q @ rel_h.T)[..., rows, h_idx], (q @ rel_w.T)[..., rows, w_idx]


def _rel_pos_logits_sliced(q, rel_h, rel_w, ws: int, ows: int):
    # One product with both tables (each padded to an even row count: 2 x 24 columns suit
    # the CPU's vectors), then for each query row x (column y) the static slice of rows
    # i - x + ows - 1, i = 0 .. ows - 1: no gather. Half the time of the gather form.
    n = 2 * ows
    pad = lambda t: jnp.pad(t, ((0, n - t.shape[0]), (0, 0)))
    p = q @ jnp.concatenate([pad(rel_h), pad(rel_w)]).T
    p = p.reshape(*q.shape[:-2], ws, ws, 2 * n)  # (..., x, y, 2n)
    lh = jnp.stack([p[..., x, :, ows - 1 - x : 2 * ows - 1 - x] for x in range(ws)], -3)
    lw = jnp.stack([p[..., :, y, n + ows - 1 - y : n + 2 * ows - 1 - y] for y in range(ws)], -2)
    return lh.reshape(*q.shape[:-1], ows), lw.reshape(*q.shape[:-1], ows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def rel_pos_logits(q, rel_h, rel_w, ws: int, ows: int):
    """Relative-position logits q.rel_height[i - x + ows - 1], q.rel_width[j - y + ows - 1].

    q (..., ws*ws, d) with queries (x, y) row-major -> two (..., ws*ws, ows) tensors over key
    rows i and key columns j. Forward: a product with the (2*ows - 1)-row tables, then static
    slices per query row/column (the same values as the gather of the plain form). Backward:
    the same terms as dense products with the tables expanded per query row/column
    (ws, ows, d), so that no scatter over the (..., ws*ws, 2*ows - 1) products is needed
    (XLA:CPU's scatter-add cost ~0.3 s per student train step).
    """
    return _rel_pos_logits_sliced(q, rel_h, rel_w, ws, ows)


def _rel_pos_logits_fwd(q, rel_h, rel_w, ws, ows):
    return _rel_pos_logits_sliced(q, rel_h, rel_w, ws, ows), (q, rel_h, rel_w)


def _rel_pos_logits_bwd(ws, ows, res, g):
    q, rel_h, rel_w = res
    glh, glw = (t.reshape(*t.shape[:-2], ws, ws, ows) for t in g)  # (..., x, y, ows)
    q2 = q.reshape(*q.shape[:-2], ws, ws, q.shape[-1])
    tab = rel_pos_index(ws, ows)[0][::ws]  # (ws, ows): query row x, key row i -> table row
    th, tw = rel_h[tab], rel_w[tab]  # (ws, ows, d)
    dq = jnp.einsum("...xyi,xid->...xyd", glh, th) + jnp.einsum("...xyj,yjd->...xyd", glw, tw)
    dth = jnp.einsum("...xyi,...xyd->xid", glh, q2)
    dtw = jnp.einsum("...xyj,...xyd->yjd", glw, q2)
    # Back from the (ws, ows, d) expansions to the tables: a scatter-add over ws*ows rows.
    drh = jnp.zeros_like(rel_h).at[tab].add(dth.astype(rel_h.dtype))
    drw = jnp.zeros_like(rel_w).at[tab].add(dtw.astype(rel_w.dtype))
    return dq.reshape(q.shape), drh, drw


rel_pos_logits.defvjp(_rel_pos_logits_fwd, _rel_pos_logits_bwd)


def _window_attend(q, k, v, *, rel_h, rel_w, ws: int, ows: int):
    """Attention inside each window: q (..., 64, d), k, v (..., 144, d) -> (..., 64, d)."""
    logits = jnp.einsum("bxyhqd,bxyhkd->bxyhqk", q, k)
    lh, lw = rel_pos_logits(q, rel_h, rel_w, ws, ows)  # (..., q, ows) each
    logits = logits + (lh[..., :, None] + lw[..., None, :]).reshape(*q.shape[:-1], ows * ows)
    # Softmax with the normalisation deferred to the (q, d) output: dividing 64 x d values
    # instead of 64 x 144 probabilities halves the attention time on CPU.
    e = jnp.exp(logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    return jnp.einsum("bxyhqk,bxyhkd->bxyhqd", e, v) / jnp.sum(e, axis=-1, keepdims=True)


class FeedForward(nn.Module):
    """Gated-dconv FFN: 1x1 to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 back."""

    expansion: float
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        hidden = int(c * self.expansion)
        project_in = Conv1x1(2 * hidden, self.bias, name="project_in")
        y = project_dwconv(x, project_in, DWConv3x3(name="dwconv"))
        x1, x2 = jnp.split(y, 2, axis=-1)
        return Conv1x1(c, self.bias, name="project_out")(gelu(x1) * x2)


def gelu(x):
    """Exact GELU in PyTorch's form, x/2 (1 + erf(x/sqrt 2)).

    jax.nn.gelu(approximate=False) uses erfc, which XLA expands into two branch polynomials,
    an exp and two divisions: on CPU the erf form is 2.5x faster forward, 1.8x with its
    gradient, and equal to ~1e-6 (max abs difference over [-12, 12]).
    """
    return 0.5 * x * (1 + lax.erf(x * (1 / math.sqrt(2))))


class TransformerBlock(nn.Module):
    """X-Restormer block, pre-norm: x += TSAB; x += FFN; x += SSAB; x += FFN."""

    channel_heads: int
    spatial_heads: int
    spatial_dim_head: int
    ffn_expansion: float
    window: int = 8
    overlap_ratio: float = 0.5

    @nn.compact
    def __call__(self, x):
        x = x + ChannelAttention(self.channel_heads, name="channel_attn")(
            LayerNorm(name="norm1")(x)
        )
        x = x + FeedForward(self.ffn_expansion, name="channel_ffn")(LayerNorm(name="norm2")(x))
        x = x + WindowAttention(
            self.spatial_heads,
            self.spatial_dim_head,
            self.window,
            self.overlap_ratio,
            name="spatial_attn",
        )(LayerNorm(name="norm3")(x))
        x = x + FeedForward(self.ffn_expansion, name="spatial_ffn")(LayerNorm(name="norm4")(x))
        return x


class CrossAttention(nn.Module):
    """SCFM level-4 cross attention: A' = 1x1[SSAB_A(A), TSAB_B(B)], B' likewise (no norm)."""

    spatial_heads: int
    spatial_dim_head: int
    channel_heads: int = 8
    window: int = 8
    overlap_ratio: float = 0.5

    @nn.compact
    def __call__(self, a, b):
        c = a.shape[-1]
        sa = lambda n: WindowAttention(
            self.spatial_heads, self.spatial_dim_head, self.window, self.overlap_ratio, name=n
        )
        ca = lambda n: ChannelAttention(self.channel_heads, name=n)
        a_out = Conv1x1(c, name="fusion_A")(
            jnp.concatenate([sa("spatial_attn_A")(a), ca("channel_attn_B")(b)], -1)
        )
        b_out = Conv1x1(c, name="fusion_B")(
            jnp.concatenate([sa("spatial_attn_B")(b), ca("channel_attn_A")(a)], -1)
        )
        return a_out, b_out


class AttentionFusion(nn.Module):
    """SCFM fusion: concat -> TSAB + SSAB (summed) -> 3x3 conv (bias) to C; no norm/residual."""

    channel_heads: int = 8
    spatial_heads: int = 4
    spatial_dim_head: int = 32
    window: int = 8
    overlap_ratio: float = 0.5

    @nn.compact
    def __call__(self, a, b):
        c = a.shape[-1]
        x = jnp.concatenate([a, b], axis=-1)
        y = ChannelAttention(self.channel_heads, name="channel_attn")(x) + WindowAttention(
            self.spatial_heads,
            self.spatial_dim_head,
            self.window,
            self.overlap_ratio,
            name="spatial_attn",
        )(x)
        return Conv3x3(c, use_bias=True, name="conv")(y)


class FiLM(nn.Module):
    """Text modulation: Linear(512->C), ReLU, Linear(C->2C) -> (gamma, beta).

    form 'paper': (1 + gamma) * F + beta (eq. 9); form 'official': gamma * F + beta.
    """

    form: str = "paper"

    @nn.compact
    def __call__(self, x, text_emb):
        c = x.shape[-1]
        t = text_emb.astype(x.dtype)
        hid = Dense(c, name="fc_0")(t)
        gb = Dense(2 * c, name="fc_2")(jax.nn.relu(hid))
        gamma, beta = gb[:, None, None, :c], gb[:, None, None, c:]
        if self.form == "paper":
            return x + gamma * x + beta
        if self.form == "official":
            return gamma * x + beta
        raise ValueError(f"unknown FiLM form {self.form!r}; use 'paper' or 'official'")


class Dense(nn.Module):
    """Linear layer with PyTorch's default init; kernel (in, out)."""

    features: int

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (cin, self.features))
        bias = self.param("bias", torch_bias_init(cin), (self.features,))
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)
