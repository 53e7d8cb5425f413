"""Structure preservation for image editing (I2I): SSIM between the generated image and its source image.

A regulariser, not a goal: on its own it is maximised by returning the source unchanged. Pair it with a target
reward (LPIPS / SSIM to the target, OCR, ...) and a smaller weight, e.g. `{"lpips": 1.0, "structure": 0.3}`.

The source is resized to the GENERATED image's size (`ops.resize_to`, antialiased bilinear), then both are turned
into one channel and compared with the Gaussian SSIM of `ssim.py` (data range 255):
* `mode="edges"` (default): Sobel gradient magnitude / 4 (clipped to 255) of the BT.601 luminance after a Gaussian
  blur of `blur_sigma` px, so that colour / texture changes are free and the layout of edges is what counts;
* `mode="luma"`: the luminance itself (also keeps shading and brightness).
Flat regions count as agreement in both maps ("no edge here" in both), so unrelated images still score well above 0
(about 0.6 for simple scenes); what matters for GRPO is the difference between samples of a group.
`max_side` bounds the comparison size (both resized so that the longer side is at most `max_side`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register
from glm_jax.rewards.ops import fit_side, groups_by_shape, resize_to, take
from glm_jax.rewards.ssim import gaussian_filter, luma, ssim

MODES = ("edges", "luma")


def sobel_magnitude(y_BHW1: jax.Array) -> jax.Array:
    """Sobel gradient magnitude `[B, H, W, 1]` (edge-replicated borders), divided by 4 so a 0->255 step gives 255."""
    p = jnp.pad(y_BHW1, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = y_BHW1.shape[1:3]
    s = lambda dy, dx: p[:, dy:dy + h, dx:dx + w]
    gx = (s(0, 2) + 2 * s(1, 2) + s(2, 2)) - (s(0, 0) + 2 * s(1, 0) + s(2, 0))
    gy = (s(2, 0) + 2 * s(2, 1) + s(2, 2)) - (s(0, 0) + 2 * s(0, 1) + s(0, 2))
    return jnp.sqrt(gx * gx + gy * gy) / 4.0


def structure_map(x_BHWC: jax.Array, mode: str = "edges", blur_sigma: float = 1.0) -> jax.Array:
    """The one-channel image compared by the structure reward (edges or luminance), values in [0, 255]."""
    y = luma(x_BHWC)
    if mode == "luma":
        return y
    if blur_sigma > 0:
        y = gaussian_filter(y, sigma=blur_sigma)
    return jnp.minimum(sobel_magnitude(y), 255.0)


@functools.partial(jax.jit, static_argnames=("hw", "mode", "blur_sigma"))
def _structure_uint8(images, sources, hw: tuple[int, int], mode: str, blur_sigma: float) -> jax.Array:
    x = structure_map(resize_to(images, hw), mode, blur_sigma)
    y = structure_map(resize_to(sources.astype(jnp.float32), hw), mode, blur_sigma)
    return ssim(x, y, 255.0)


@register("structure")
class StructureReward(Reward):
    """SSIM of edge (or luminance) maps of the generated image and its source, in [-1, 1]; a regulariser for I2I."""

    needs_source = True

    def __init__(self, *, mode: str = "edges", blur_sigma: float = 1.0, max_side: int | None = None):
        if mode not in MODES:
            raise RewardError(f"unknown structure mode '{mode}' (known: {', '.join(MODES)})")
        self.mode = mode
        self.blur_sigma = float(blur_sigma)
        self.max_side = None if max_side is None else int(max_side)

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        sources = [ctx.source(i, self.name) for i in range(len(ctx))]
        hw = fit_side(tuple(images.shape[1:3]), self.max_side)
        out = np.zeros(len(ctx), np.float32)
        for idx in groups_by_shape(sources).values():
            y = jnp.asarray(np.stack([sources[i] for i in idx]))
            out[idx] = np.asarray(_structure_uint8(take(images, idx), y, hw, self.mode, self.blur_sigma))
        return out, {}
