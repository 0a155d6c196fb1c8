"""Attention of the X-Restormer fusion U-Net (NHWC) and the blocks built around it.

TSAB = `ChannelAttention` (transposed attention over channels), SSAB = `WindowAttention`
(overlapping-window spatial attention, "OCAB"), `TransformerBlock` = TSAB + FFN + SSAB + FFN,
SCFM = `CrossAttention` (level 4) + `AttentionFusion` (every level).

Speed on CPU: the overlapping 12x12 key windows are built without a gather's scatter in the
backward pass (`head_windows`), large layers run by bands of window rows (WINDOW_CHUNK_LOGITS),
and TSAB's channel Gram matrices run on blocks of pixels (`pixel_gram`); tests keep each equal
to a plain form.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dtpf_jax.blocks import (
    Conv1x1,
    Conv3x3,
    DWConv3x3,
    FeedForward,
    LayerNorm,
    pixel_gram,
    pointwise,
    project_dwconv,
)


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


@dataclasses.dataclass(frozen=True)
class FrameStats:
    """TSAB statistics of a whole frame for a network run on one tile of it.

    TSAB normalises q, k and forms their Gram matrix over every pixel of its input, so a tile
    alone sees its own statistics, not the frame's. Inside `frame_stats(FrameStats(mask))`
    each ChannelAttention runs on the tile's statistics and writes its sums over the pixels
    the tile owns (`mask` (B, H, W) at input resolution, 1 where owned; the owned parts of all
    tiles partition the frame) to the collection 'tsab_stats' as (q k^T, sum q^2, sum k^2).
    Inside `frame_stats(FrameStats(None))` it runs on the sums of the collection
    'tsab_global' instead: the frame's, the tiles' added up by the caller.
    """

    mask: jax.Array | None

    def exchange(self, module: nn.Module, height: int, q, k):
        """The sums this tile's layer runs on: the frame's (no mask) or the tile's own.

        q, k (B, N, heads, C) at a level of `height` rows; the mask is read at that level by
        striding (owned parts end on multiples of 8 pixels: whole level-4 pixels)."""
        if self.mask is None:
            frame = module.get_variable("tsab_global", "sums")
            return tuple(g.astype(q.dtype) for g in frame)
        f = self.mask.shape[1] // height
        m = self.mask[:, ::f, ::f].reshape(q.shape[0], q.shape[1], 1, 1).astype(q.dtype)
        c = q.shape[-1]
        # One product and one sum over the pixels for owned and whole-tile sums alike: each
        # further reader of q, k costs a pass over them (XLA fuses their 3x3 conv into it).
        grams = pixel_gram(jnp.concatenate([q * m, q], -1), k)  # (B, heads, 2C, C)
        qq, kk = jnp.square(q), jnp.square(k)
        squares = jnp.sum(jnp.concatenate([qq * m, qq, kk * m, kk], -1), axis=1)  # (B, heads, 4C)
        own = (grams[..., :c, :], squares[..., :c], squares[..., 2 * c : 3 * c])
        local = (grams[..., c:, :], squares[..., c : 2 * c], squares[..., 3 * c :])
        module.variable("tsab_stats", "sums", lambda: own).value = own
        # The tile's sums as owned + the rest: the layer's output then depends on its owned
        # sums, so XLA computes them at once. Left to be outputs only, they were scheduled
        # last, keeping every layer's q and k alive (8x a plain pass's memory).
        return tuple(a + (b - a) for a, b in zip(own, local, strict=True))


_FRAME_STATS: contextvars.ContextVar[FrameStats | None] = contextvars.ContextVar(
    "frame_stats", default=None
)


@contextlib.contextmanager
def frame_stats(stats: FrameStats):
    """Within it (while tracing), TSAB layers take statistics as FrameStats says."""
    token = _FRAME_STATS.set(stats)
    try:
        yield
    finally:
        _FRAME_STATS.reset(token)


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
        frame = _FRAME_STATS.get()
        if frame is None:
            gram = pixel_gram(q, k)
            sq, sk = jnp.sum(jnp.square(q), axis=1), jnp.sum(jnp.square(k), axis=1)
        else:  # a large tile that takes the frame's statistics
            gram, sq, sk = frame.exchange(self, h, q, k)
        # rsqrt of the clamped square: same value as 1/max(|q|, 1e-12), but a finite gradient
        # on flat (all-zero) inputs where sqrt's derivative is infinite.
        inv_q, inv_k = lax.rsqrt(jnp.maximum(sq, 1e-24)), lax.rsqrt(jnp.maximum(sk, 1e-24))
        attn = gram * inv_q[..., :, None] * inv_k[..., None, :]
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
