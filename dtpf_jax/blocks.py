"""Convolution, norm, FFN and FiLM layers of the X-Restormer fusion U-Net (NHWC), named after
the official tensors; the attention layers and the blocks built from them are in attention.py.

Speed on CPU drives two formulations, each kept numerically equal to a plain one (tests):
depthwise 3x3 convs are nine shifted multiply-adds with a hand-written VJP (XLA:CPU's grouped
convolution is several times slower), and every contraction over pixels (1x1-conv kernel
gradients, TSAB's channel Gram matrices) runs on blocks of pixels (`pixel_gram`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
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
