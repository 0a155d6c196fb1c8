"""Colour conventions (BT.601), one place for all of them.

Works on numpy and jax arrays alike; the channel axis is last (NHWC / HWC).
"""

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def rgb_to_gray(rgb):
    """0.299 R + 0.587 G + 0.114 B; a 1-channel input comes back unchanged."""
    if rgb.shape[-1] == 1:
        return rgb
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def cb_cr(rgb):
    """Chroma without the 0.5 offset, as the official colour loss computes it: (..., 2)."""
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return _concat(cb, cr, like=rgb)


def rgb_to_ycbcr(rgb):
    """Full-range BT.601 YCbCr for images in [0, 1]: Cb, Cr carry the +0.5 offset."""
    y = rgb_to_gray(rgb)
    cbcr = cb_cr(rgb) + 0.5
    return _concat(y, cbcr, like=rgb)


def ycbcr_to_rgb(ycc):
    """Inverse of `rgb_to_ycbcr`."""
    y, cb, cr = ycc[..., 0:1], ycc[..., 1:2] - 0.5, ycc[..., 2:3] - 0.5
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return _concat(r, g, b, like=ycc)


def _concat(*parts, like):
    if type(like).__module__.startswith("numpy"):
        import numpy as np

        return np.concatenate(parts, axis=-1)
    import jax.numpy as jnp

    return jnp.concatenate(parts, axis=-1)
