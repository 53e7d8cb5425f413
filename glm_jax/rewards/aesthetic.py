"""Aesthetic rewards: a user-supplied model (`aesthetic`) and a hand-made heuristic (`aesthetic_heuristic`).

`aesthetic` loads the user's scorer from a local path, `model=`:
* `"package.module:function"` or `"/path/to/file.py:function"`: a callable `fn(images, prompts) -> [B]` with
  `images` host uint8 `[B, H, W, 3]` and `prompts` a list of str. The module is imported once, when the reward is
  built (load weights at import time or lazily inside it).
* `"/path/to/mlp.npz"` or `"/path/to/mlp.msgpack"` (flax.serialization): a small MLP over image features, arrays
  `w0 [F, H1], b0 [H1], w1 [H1, H2], b1, ..., wL [*, 1], bL [1]`, ReLU between layers, optional `mean [F]` /
  `std [F]` to standardise the features first. Features (`features=`): `"heuristic"` (the vector
  `HEURISTIC_FEATURES` of `heuristic_features`) or a `"module:function"` callable `fn(images) -> [B, F]`
  (e.g. an image embedding).

`aesthetic_heuristic` is NOT a learned aesthetic score: a weighted mean of simple image statistics in [0, 1]
(colourfulness, sharpness, exposure, contrast), useful as a cheap regulariser or a smoke-test reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from glm_jax.rewards.base import Reward, RewardContext, RewardError, register

HEURISTIC_FEATURES = ("colourfulness", "sharpness", "exposure", "contrast")


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


def heuristic_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Image statistics, each `[B]` in [0, 1], of uint8 `[B, H, W, 3]` images.

    * colourfulness: Hasler & Suesstrunk (2003) M = std(rg, yb) + 0.3 mean(rg, yb) over 109 ("extremely
      colourful"), clipped to 1;
    * sharpness: v / (v + 300) with v the variance of the 4-neighbour Laplacian of the luminance (0..255);
    * exposure: (1 - 2 |mean luminance / 255 - 0.5|) * (1 - fraction of pixels with luminance < 3 or > 252);
    * contrast: luminance standard deviation / 80, clipped to 1.
    """
    x = np.asarray(images, np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    m = (np.sqrt(rg.var(axis=(1, 2)) + yb.var(axis=(1, 2)))
         + 0.3 * np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2))
    y = _luma(x)
    lap = (y[:, 1:-1, :-2] + y[:, 1:-1, 2:] + y[:, :-2, 1:-1] + y[:, 2:, 1:-1] - 4 * y[:, 1:-1, 1:-1])
    v = lap.var(axis=(1, 2)) if lap.size else np.zeros(len(x), np.float32)
    mean = y.mean(axis=(1, 2)) / 255.0
    clipped = ((y < 3) | (y > 252)).mean(axis=(1, 2))
    return {
        "colourfulness": np.minimum(1.0, m / 109.0),
        "sharpness": v / (v + 300.0),
        "exposure": (1.0 - 2.0 * np.abs(mean - 0.5)) * (1.0 - clipped),
        "contrast": np.minimum(1.0, y.std(axis=(1, 2)) / 80.0),
    }


@register("aesthetic_heuristic")
class AestheticHeuristicReward(Reward):
    """Weighted mean of `heuristic_features` (a heuristic, not a learned aesthetic model); score in [0, 1]."""

    def __init__(self, *, weights: Mapping[str, float] | None = None):
        w = dict(weights) if weights is not None else {k: 1.0 for k in HEURISTIC_FEATURES}
        for k in w:
            if k not in HEURISTIC_FEATURES:
                raise RewardError(f"unknown feature '{k}' in aesthetic_heuristic weights "
                                  f"(known: {', '.join(HEURISTIC_FEATURES)})")
        if sum(w.values()) <= 0:
            raise RewardError("aesthetic_heuristic weights must sum to a positive number")
        self.weights = w

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        f = heuristic_features(np.asarray(images))
        total = sum(w * f[k] for k, w in self.weights.items()) / sum(self.weights.values())
        return total, {k: float(v.mean()) for k, v in f.items()}


def load_callable(spec: str) -> Callable:
    """`"pkg.module:attr"` or `"/path/file.py:attr"` -> the attribute; RewardError naming the spec otherwise."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise RewardError(f"callable spec '{spec}' must look like 'package.module:function' or 'file.py:function'")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise RewardError(f"no such file '{mod_name}' (from spec '{spec}')")
            name = "glm_jax_user_" + os.path.splitext(os.path.basename(mod_name))[0]
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != os.path.abspath(mod_name):
                s = importlib.util.spec_from_file_location(name, os.path.abspath(mod_name))
                module = importlib.util.module_from_spec(s)
                s.loader.exec_module(module)
                sys.modules[name] = module
        else:
            module = importlib.import_module(mod_name)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - report any import failure with the spec
        raise RewardError(f"cannot import '{mod_name}' (from spec '{spec}'): {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"'{attr}' in '{mod_name}' is not a callable (from spec '{spec}')")
    return fn


def load_mlp(path: str) -> dict[str, np.ndarray]:
    """MLP weights from `.npz` or flax-msgpack `.msgpack` (keys w0, b0, w1, b1, ..., optional mean / std)."""
    if not os.path.isfile(path):
        raise RewardError(f"aesthetic model file '{path}' does not exist")
    if path.endswith(".npz"):
        with np.load(path) as z:
            p = {k: np.asarray(z[k], np.float32) for k in z.files}
    else:
        from flax import serialization

        with open(path, "rb") as f:
            p = {k: np.asarray(v, np.float32) for k, v in serialization.msgpack_restore(f.read()).items()}
    n = 0
    while f"w{n}" in p:
        if f"b{n}" not in p or p[f"w{n}"].ndim != 2 or p[f"b{n}"].shape != p[f"w{n}"].shape[1:]:
            raise RewardError(f"{path}: layer {n} needs w{n} [in, out] and b{n} [out]")
        if n and p[f"w{n}"].shape[0] != p[f"w{n - 1}"].shape[1]:
            raise RewardError(f"{path}: w{n} takes {p[f'w{n}'].shape[0]} inputs, w{n - 1} gives "
                              f"{p[f'w{n - 1}'].shape[1]}")
        n += 1
    if n == 0 or p[f"w{n - 1}"].shape[1] != 1:
        raise RewardError(f"{path}: expected layers w0, b0, ..., the last with one output")
    extra = set(p) - {f"{c}{i}" for c in "wb" for i in range(n)} - {"mean", "std"}
    if extra:
        raise RewardError(f"{path}: unexpected arrays {sorted(extra)}")
    return p


def mlp_apply(p: dict[str, np.ndarray], feats_BF: np.ndarray) -> np.ndarray:
    """Scores `[B]` of the MLP `p` on features `[B, F]`."""
    x = np.asarray(feats_BF, np.float32)
    if x.ndim != 2 or x.shape[1] != p["w0"].shape[0]:
        raise RewardError(f"aesthetic MLP expects features [B, {p['w0'].shape[0]}], got {x.shape}")
    if "mean" in p:
        x = x - p["mean"]
    if "std" in p:
        x = x / p["std"]
    n = sum(1 for k in p if k.startswith("w"))
    for i in range(n):
        x = x @ p[f"w{i}"] + p[f"b{i}"]
        if i < n - 1:
            x = np.maximum(x, 0.0)
    return x[:, 0]


@register("aesthetic")
class AestheticReward(Reward):
    """A user's aesthetic model from a local path (`model=`; see the module docstring for the accepted forms)."""

    def __init__(self, *, model: str | None = None, features: str = "heuristic"):
        if not model:
            raise RewardError("reward 'aesthetic' needs options.aesthetic.model: 'module:function', "
                              "'file.py:function', or a weights file '.npz' / '.msgpack'")
        self.model = model
        if model.endswith((".npz", ".msgpack")):
            self.mlp = load_mlp(model)
            self.features = (lambda im: np.stack([heuristic_features(im)[k] for k in HEURISTIC_FEATURES], -1)
                             if features == "heuristic" else load_callable(features))
            self.fn = None
        else:
            self.fn = load_callable(model)
            self.mlp = None

    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        host = np.asarray(images)
        if self.fn is not None:
            out = np.asarray(self.fn(host, list(ctx.prompts)), np.float32).reshape(-1)
        else:
            out = mlp_apply(self.mlp, self.features(host))
        if out.shape != (host.shape[0],):
            raise RewardError(f"aesthetic model '{self.model}' returned {out.shape[0]} scores for {host.shape[0]} "
                              "images")
        return out, {}
