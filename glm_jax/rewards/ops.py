"""Image helpers shared by the rewards: the resize rule and batching samples by target size."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def resize_to(x_BHWC: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Float images `[B, H, W, C]` brought to `hw` by antialiased bilinear interpolation (identity if same size).

    The rule used by every reward that compares two images of different sizes: a triangle filter, widened by the
    scale factor when downsampling (as PIL's BILINEAR), on float pixel values without re-quantisation.
    """
    if tuple(x_BHWC.shape[1:3]) == tuple(hw):
        return x_BHWC
    return jax.image.resize(x_BHWC, (x_BHWC.shape[0], *hw, x_BHWC.shape[3]), method="linear", antialias=True)


def fit_side(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """`hw` scaled down (aspect kept, rounded) so that its longer side is at most `max_side` (None: unchanged)."""
    h, w = hw
    if max_side is None or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def groups_by_shape(arrays: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Sample indices grouped by array shape (each group is scored in one jitted call)."""
    out: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        out.setdefault(tuple(a.shape), []).append(i)
    return out


def take(images, idx: list[int]) -> jax.Array:
    """`images[idx]` as a float32 jax array (host or device input)."""
    if len(idx) == images.shape[0] and idx == list(range(len(idx))):
        return jnp.asarray(images, jnp.float32)
    return jnp.asarray(images)[np.asarray(idx)].astype(jnp.float32)
