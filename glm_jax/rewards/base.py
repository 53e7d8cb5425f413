"""Reward interface, batch context, registry, and the weighted combination used by the GRPO trainer.

A reward maps generated uint8 images `[B, H, W, 3]` plus a `RewardContext` (prompts, optional target images,
optional source images) to float32 scores `[B]` (higher is better). NaN means "not applicable" (e.g. the OCR
reward on a prompt without quoted text); the advantage code excludes NaN samples. Every call reports its wall time
and reward-specific metrics (`RewardResult`).
"""

from __future__ import annotations

import abc
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RewardError(ValueError):
    """Bad reward input or configuration; the message is one line naming the offending key or value."""


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} shape={tuple(shape) if shape is not None else None} dtype={dtype}"


def check_image(x: Any, what: str) -> np.ndarray:
    """`x` (numpy / PIL / array-like) as a host uint8 `[H, W, 3]` array; a clear RewardError otherwise."""
    if hasattr(x, "mode") and hasattr(x, "convert"):  # PIL image
        x = np.asarray(x.convert("RGB"))
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
            raise RewardError(f"{what} contains NaN (expected uint8 [H, W, 3] in 0..255)")
        raise RewardError(f"{what} must be uint8 [H, W, 3], got {_describe(arr)}")
    if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
        raise RewardError(f"{what} must be uint8 [H, W, 3], got {_describe(arr)}")
    return arr


def check_images(images: Any) -> Any:
    """Validates a generated batch: uint8 `[B, H, W, 3]` (numpy or jax; jax arrays stay on device)."""
    dtype = getattr(images, "dtype", None)
    if dtype is None:
        images = np.asarray(images)
        dtype = images.dtype
    if dtype != np.uint8:
        if np.issubdtype(dtype, np.floating) and bool(np.isnan(np.asarray(images)).any()):
            raise RewardError("images contain NaN (expected uint8 [B, H, W, 3] in 0..255)")
        raise RewardError(f"images must be uint8 [B, H, W, 3], got {_describe(images)}")
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[:3]) < 1:
        raise RewardError(f"images must be uint8 [B, H, W, 3], got {_describe(images)}")
    return images


@dataclass(frozen=True)
class RewardContext:
    """What a reward may compare a batch with: one prompt per image, and optional per-image target / source images.

    `targets[i]` / `sources[i]` are host uint8 `[H_i, W_i, 3]` arrays (sizes may differ between samples) or None.
    Build it with `RewardContext.make`, which validates and converts PIL images.
    """

    prompts: tuple[str, ...]
    targets: tuple[np.ndarray | None, ...] | None = None
    sources: tuple[np.ndarray | None, ...] | None = None

    @staticmethod
    def make(prompts: Sequence[str], targets: Sequence[Any] | None = None,
             sources: Sequence[Any] | None = None) -> RewardContext:
        """Validated context; `targets` / `sources` entries may be None (then a reward that needs them errors)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise RewardError("prompts must be a sequence of str")
        n = len(prompts)

        def images(seq: Sequence[Any] | None, what: str) -> tuple[np.ndarray | None, ...] | None:
            if seq is None:
                return None
            if len(seq) != n:
                raise RewardError(f"{what} has {len(seq)} entries for {n} prompts")
            return tuple(None if x is None else check_image(x, f"{what}[{i}]") for i, x in enumerate(seq))

        return RewardContext(tuple(prompts), images(targets, "targets"), images(sources, "sources"))

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, rows: slice) -> RewardContext:
        """The context of samples `rows` (a slice)."""
        cut = (lambda seq: None if seq is None else seq[rows])
        return RewardContext(self.prompts[rows], cut(self.targets), cut(self.sources))

    def target(self, i: int, reward: str) -> np.ndarray:
        """Target image of sample `i`; RewardError naming the reward and prompt when there is none."""
        return self._get(self.targets, "target", i, reward)

    def source(self, i: int, reward: str) -> np.ndarray:
        """Source image of sample `i` (I2I); RewardError naming the reward and prompt when there is none."""
        return self._get(self.sources, "source", i, reward)

    def _get(self, seq, what: str, i: int, reward: str) -> np.ndarray:
        x = None if seq is None else seq[i]
        if x is None:
            raise RewardError(f"reward '{reward}' needs a {what} image but sample {i} "
                              f"(prompt {self.prompts[i][:60]!r}) has none")
        return x


@dataclass
class RewardResult:
    """Scores `[B]` float32 (NaN = not applicable), wall seconds of the call, and metrics for logging."""

    scores: np.ndarray
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# interface and registry


class Reward(abc.ABC):
    """Base class: `__call__` validates, times and checks the output of `score`, which subclasses implement."""

    name: str = "reward"
    needs_source: bool = False      # compares each image with its source image (I2I only)

    @abc.abstractmethod
    def score(self, images: Any, ctx: RewardContext) -> tuple[np.ndarray, dict[str, float]]:
        """Scores `[B]` and metrics for validated uint8 `images` `[B, H, W, 3]` (numpy or jax)."""

    def __call__(self, images: Any, ctx: RewardContext) -> RewardResult:
        images = check_images(images)
        if len(ctx) != images.shape[0]:
            raise RewardError(f"reward '{self.name}': {images.shape[0]} images for {len(ctx)} prompts")
        t0 = time.perf_counter()
        scores, metrics = self.score(images, ctx)
        scores = np.asarray(scores, dtype=np.float32)  # blocks on device results, so the time is the real cost
        seconds = time.perf_counter() - t0
        if scores.shape != (images.shape[0],):
            raise RewardError(f"reward '{self.name}' returned shape {scores.shape}, expected ({images.shape[0]},)")
        return RewardResult(scores, seconds, dict(metrics))


REGISTRY: dict[str, type[Reward]] = {}


def register(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: makes a Reward subclass buildable by `name` from a config."""

    def wrap(cls: type[Reward]) -> type[Reward]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise RewardError(f"reward name '{name}' is already registered")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def option_names(name: str) -> tuple[str, ...]:
    """The keyword options a registered reward accepts."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return tuple(p for p, v in params.items() if p != "self" and v.kind is inspect.Parameter.KEYWORD_ONLY)


# names users reach for that are spelled otherwise here
_ALIASES = {"ocr": "text", "text_accuracy": "text", "aesthetics": "aesthetic", "edges": "structure"}


def _lookup(name: str) -> type[Reward]:
    if name not in REGISTRY:
        hint = f"; did you mean '{_ALIASES[name]}'?" if _ALIASES.get(name) in REGISTRY else ""
        raise RewardError(f"unknown reward '{name}' (known: {', '.join(sorted(REGISTRY))}){hint}")
    return REGISTRY[name]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """RewardError naming the first option `name` does not accept."""
    known = option_names(name)
    for key in options:
        if key not in known:
            raise RewardError(f"unknown option '{key}' for reward '{name}' (known: {', '.join(known) or 'none'})")


def make_reward(name: str, **options: Any) -> Reward:
    """Builds the registered reward `name` with its keyword options (checked first)."""
    cls = _lookup(name)
    check_options(name, options)
    return cls(**options)


# ---------------------------------------------------------------------------------------------------------------
# combination


@dataclass
class CombinedResult:
    """`total[B]` = weighted combination, `components[name][B]` = each reward's scores, plus metrics to log."""

    total: np.ndarray
    components: dict[str, np.ndarray]
    metrics: dict[str, float]


def combine(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum over applicable components: `total_n = Σ_{j: R_nj not NaN} w_j R_nj`.

    NaN components are skipped (weights are not renormalised); a sample whose components are all NaN gets NaN
    (excluded from the advantages). Applicability is a property of the prompt, so all members of a GRPO group skip
    the same components and remain comparable.
    """
    names = list(weights)
    r = np.stack([np.asarray(components[k], np.float64) for k in names], axis=0)  # [J, B]
    w = np.asarray([weights[k] for k in names], np.float64)[:, None]
    valid = ~np.isnan(r)
    total = np.where(valid, w * np.where(valid, r, 0.0), 0.0).sum(axis=0)
    return np.where(valid.any(axis=0), total, np.nan).astype(np.float32)


def nan_mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation over the applicable (non-NaN) scores; both NaN, without numpy's empty-slice
    warnings, when no score applies (a reward skipped for every sample)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)


def component_metrics(components: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`<reward>/mean` and `<reward>/std` (over the applicable samples; NaN when none is) and `<reward>/nan_frac`
    of each component, e.g. of scores gathered from several processes."""
    out: dict[str, float] = {}
    for name, v in components.items():
        v = np.asarray(v, np.float64)
        out[f"{name}/mean"], out[f"{name}/std"] = nan_mean_std(v)
        out[f"{name}/nan_frac"] = float(np.isnan(v).mean())
    return out


class RewardSet:
    """Named rewards with weights; calling it scores a batch with each reward and combines them."""

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, Reward]):
        self.weights = dict(weights)
        self.rewards = {k: rewards[k] for k in self.weights}

    def __bool__(self) -> bool:
        return bool(self.weights)

    def __call__(self, images: Any, ctx: RewardContext) -> CombinedResult:
        images = check_images(images)
        components: dict[str, np.ndarray] = {}
        metrics: dict[str, float] = {}
        for name, reward in self.rewards.items():
            res = reward(images, ctx)
            components[name] = res.scores
            metrics[f"{name}/seconds"] = res.seconds
            metrics.update(component_metrics({name: res.scores}))
            metrics.update({f"{name}/{k}": float(v) for k, v in res.metrics.items()})
        if not components:
            raise RewardError("empty reward set: configure at least one reward with a weight")
        total = combine(components, self.weights)
        return CombinedResult(total, components, metrics)

    def on_devices(self, images: Any, ctx: RewardContext, devices: Sequence[Any]) -> CombinedResult:
        """The set's result with the samples split into contiguous blocks over `devices`, each block scored in its
        own thread with that device as JAX's default device (a process that drives several GPUs scores on all
        of them). Every reward scores each image on its own, so the scores are those of one call; the metrics
        `<reward>/seconds` are the slowest block's, the others the blocks' sample-weighted means."""
        import jax
        images = check_images(images)
        b = images.shape[0]
        k = min(len(devices), b)
        if k <= 1:
            return self(images, ctx)
        edges = np.linspace(0, b, k + 1).round().astype(int)
        blocks = [slice(int(edges[i]), int(edges[i + 1])) for i in range(k)]

        def one(i: int) -> CombinedResult:
            with jax.default_device(devices[i]):
                return self(images[blocks[i]], ctx.take(blocks[i]))

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=k) as pool:
            parts = list(pool.map(one, range(k)))
        components = {n: np.concatenate([p.components[n] for p in parts]) for n in parts[0].components}
        sizes = np.asarray([sl.stop - sl.start for sl in blocks], np.float64)
        metrics: dict[str, float] = {}
        for key in parts[0].metrics:
            vals = np.asarray([p.metrics.get(key, math.nan) for p in parts], np.float64)
            metrics[key] = float(vals.max()) if key.endswith("/seconds") else float(np.nansum(vals * sizes)
                                                                                      / sizes.sum())
        metrics.update(component_metrics(components))
        return CombinedResult(np.concatenate([p.total for p in parts]), components, metrics)


SETS = ("ar", "dit")


def _as_dict(cfg: Any, what: str) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise RewardError(f"{what} must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def build_reward_sets(config: Any) -> dict[str, RewardSet]:
    """`{"ar": RewardSet, "dit": RewardSet}` from `{"ar": {name: weight}, "dit": {...}, "options": {name: {...}}}`.

    Accepts plain dicts and ml_collections ConfigDicts. Each reward used by both sets is built once and shared.
    Unknown top-level keys, reward names, or options, and non-finite weights, are one-line RewardErrors naming the
    key. Options of rewards not used by any set are still checked.
    """
    cfg = _as_dict(config, "reward config")
    for key in cfg:
        if key not in (*SETS, "options"):
            raise RewardError(f"unknown reward config key '{key}' (expected: ar, dit, options)")
    options = _as_dict(cfg.get("options"), "reward options")
    for name, opts in options.items():
        check_options(name, _as_dict(opts, f"options.{name}"))
    weights: dict[str, dict[str, float]] = {}
    for s in SETS:
        weights[s] = {}
        for name, w in _as_dict(cfg.get(s), f"reward set '{s}'").items():
            try:
                _lookup(name)
            except RewardError as e:
                raise RewardError(f"{s}.{name}: {e}") from None
            try:
                wf = float(w)
            except (TypeError, ValueError):
                raise RewardError(f"weight of {s}.{name} must be a number, got {w!r}") from None
            if not math.isfinite(wf):
                raise RewardError(f"weight of {s}.{name} must be finite, got {w!r}")
            weights[s][name] = wf
    built: dict[str, Reward] = {}
    for s in SETS:
        for name in weights[s]:
            if name not in built:
                built[name] = make_reward(name, **_as_dict(options.get(name), f"options.{name}"))
    return {s: RewardSet(weights[s], built) for s in SETS}
