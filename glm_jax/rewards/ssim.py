"""SSIM (Wang et al. 2004) in JAX, equal to scikit-image's Gaussian-weighted SSIM, and the `ssim` reward.

Matches `skimage.metrics.structural_similarity(im1, im2, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255, channel_axis=-1)`:
* window: separable Gaussian, sigma 1.5, truncated at radius `int(3.5 * sigma + 0.5)` = 5 (11 taps), normalised;
* borders: scipy.ndimage mode 'reflect' (half-sample symmetric: `d c b a | a b c d`), i.e. numpy 'symmetric';
* population (co)variances; C1 = (0.01 R)^2, C2 = (0.03 R)^2;
* the SSIM map is cropped by the radius (5 px) on every side of H and W, then averaged over pixels and channels.

Filtering is done with explicit shifted sums (exact float32 adds, no TF32 convolutions on GPU), and the
(co)variances are computed around a per-image/channel mean to avoid cancellation in float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register
from glm_jax.rewards.ops import fit_side, groups_by_shape, resize_to, take

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


def gaussian_taps(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage's normalised 1-D Gaussian kernel (radius `int(truncate * sigma + 0.5)`)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _filter_axis(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    r = len(taps) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    return sum(float(w) * jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k, w in enumerate(taps))


def gaussian_filter(x_BHWC: jax.Array, sigma: float = 1.5, truncate: float = 3.5) -> jax.Array:
    """Separable Gaussian blur over H and W with scipy's 'reflect' borders (channels filtered independently)."""
    taps = gaussian_taps(sigma, truncate)
    return _filter_axis(_filter_axis(x_BHWC, taps, 1), taps, 2)


def ssim_map(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 255.0, sigma: float = 1.5) -> jax.Array:
    """Per-pixel SSIM `[B, H, W, C]` of float images (uncropped)."""
    x = x_BHWC.astype(jnp.float32)
    y = y_BHWC.astype(jnp.float32)
    c = 0.5 * (jnp.mean(x, axis=(1, 2), keepdims=True) + jnp.mean(y, axis=(1, 2), keepdims=True))
    x, y = x - c, y - c  # (co)variances are shift invariant; smaller magnitudes -> less float32 cancellation
    f = functools.partial(gaussian_filter, sigma=sigma)
    ux, uy = f(x), f(y)
    vx = f(x * x) - ux * ux
    vy = f(y * y) - uy * uy
    vxy = f(x * y) - ux * uy
    ux, uy = ux + c, uy + c
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 255.0, sigma: float = 1.5) -> jax.Array:
    """Mean SSIM `[B]` (skimage's Gaussian SSIM, border of radius `int(3.5 sigma + 0.5)` cropped)."""
    r = len(gaussian_taps(sigma)) // 2
    h, w = x_BHWC.shape[1:3]
    if min(h, w) < 2 * r + 1:
        raise RewardError(f"SSIM needs images of at least {2 * r + 1}x{2 * r + 1} pixels, got {h}x{w}")
    s = ssim_map(x_BHWC, y_BHWC, data_range, sigma)[:, r:h - r, r:w - r, :]
    return jnp.mean(s, axis=(1, 2, 3))


def luma(x_BHWC: jax.Array) -> jax.Array:
    """BT.601 luminance `[B, H, W, 1]` of RGB values."""
    return (x_BHWC.astype(jnp.float32) @ jnp.asarray(LUMA))[..., None]


@functools.partial(jax.jit, static_argnames=("hw", "luma_only"))
def _ssim_uint8(images: jax.Array, targets: jax.Array, hw: tuple[int, int], luma_only: bool) -> jax.Array:
    x = resize_to(images, hw)
    y = resize_to(targets.astype(jnp.float32), hw)
    if luma_only:
        x, y = luma(x), luma(y)
    return ssim(x, y, 255.0)


@register("ssim")
class SSIMReward(Reward):
    """Mean SSIM in [-1, 1] to the sample's target image (generated image resized to the target's size).

    `luma_only` compares BT.601 luminance instead of the three RGB channels; `max_side` bounds the comparison size
    (both images resized so that the longer side is at most `max_side`).
    """

    def __init__(self, *, luma_only: bool = False, max_side: int | None = None):
        self.luma_only = bool(luma_only)
        self.max_side = None if max_side is None else int(max_side)

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        targets = [ctx.target(i, self.name) for i in range(len(ctx))]
        out = np.zeros(len(ctx), np.float32)
        for shape, idx in groups_by_shape(targets).items():
            hw = fit_side(shape[:2], self.max_side)
            y = jnp.asarray(np.stack([targets[i] for i in idx]))
            out[idx] = np.asarray(_ssim_uint8(take(images, idx), y, hw, self.luma_only))
        return out, {}
